//! The seam's local side: [`Operations`] on this host's [`Fleet`].
//!
//! Every default a request leaves open is filled in here from
//! [`forkd_ops::policy`], and every error leaves as an [`OpError`] with its
//! kind and hint, so the CLI, the daemon and every other front end get the
//! same behaviour whether they run the operation here or through a daemon
//! (whose handlers call this very implementation).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use forkd_ops::{
    policy, Accel, BranchOutcome, BranchRequest, Child, CreateRequest, Created, EvalOutcome,
    ExecOutcome, ExecSpec, GcReport, KilledAll, Network, OnChild, OpError, Operations, Pong,
    PoolStatus, Pruned, RemoveSnapshot, Sandbox, Snapshot, SnapshotDetail, SpawnOutcome,
    SpawnRequest, Stream,
};
use forkd_protocol::client::OutputStream;

use crate::artifacts::{ArtifactOptions, Image};
use crate::helper::{self, Job};
use crate::sandbox::BootOptions;
use crate::{CoreError, Fleet};

impl From<&CoreError> for OpError {
    fn from(e: &CoreError) -> OpError {
        OpError {
            kind: e.kind(),
            hint: e.hint(),
            message: e.to_string(),
        }
    }
}

/// How long an `eval` may run.
const EVAL_TIMEOUT: Duration = Duration::from_secs(30);

fn boot_options(req: &CreateRequest) -> BootOptions {
    BootOptions {
        cpus: req.cpus.unwrap_or(policy::CPUS),
        mem_mib: req.mem_mib.unwrap_or(policy::MEM_MIB),
        accel: match req.accel.unwrap_or_default() {
            Accel::Auto => forkd_vm::AccelRequest::Auto,
            Accel::Kvm => forkd_vm::AccelRequest::Kvm,
            Accel::Tcg => forkd_vm::AccelRequest::Tcg,
        },
        network: match req.network.unwrap_or_default() {
            Network::User => forkd_vm::Network::User,
            Network::None => forkd_vm::Network::None,
        },
        tcg_tb_mib: req.tcg_tb_mib,
        huge_pages: if req.huge_pages {
            forkd_vm::HugePages::Hugetlb
        } else {
            forkd_vm::HugePages::Off
        },
        prealloc: req.prealloc,
        ..BootOptions::default()
    }
}

impl Operations for Fleet {
    fn create(&self, req: &CreateRequest, progress: &dyn Fn(&str)) -> Result<Created, OpError> {
        let name = req.image.as_deref().unwrap_or(policy::IMAGE);
        let image: Image = name.parse().map_err(OpError::bad_input)?;
        if let Some(tag) = &req.snapshot_as {
            forkd_ops::validate_tag(tag)?;
        }
        let artifacts = crate::artifacts::ensure(
            self.env(),
            &ArtifactOptions {
                kernel: req.guest.kernel.clone(),
                modules: req.guest.modules.clone(),
                agent: req.guest.agent.clone(),
                image,
            },
            progress,
        )?;
        let (sandbox, boot) = Fleet::create(self, &artifacts, name, &boot_options(req))?;
        if let Some(tag) = &req.snapshot_as {
            if let Err(e) = Fleet::snapshot(self, &sandbox.id, tag) {
                let _ = Fleet::kill(self, &sandbox.id);
                return Err(e.into());
            }
        }
        Ok(Created {
            sandbox: self.sandbox_view(&sandbox.id)?,
            boot_ms: boot.as_secs_f64() * 1000.0,
        })
    }

    fn list(&self) -> Result<Vec<Sandbox>, OpError> {
        Ok(Fleet::list(self)?)
    }

    fn sandbox(&self, id: &str) -> Result<Sandbox, OpError> {
        Ok(self.sandbox_view(id)?)
    }

    fn kill(&self, id: &str) -> Result<(), OpError> {
        Ok(Fleet::kill(self, id)?)
    }

    fn kill_all(&self) -> Result<KilledAll, OpError> {
        let mut out = KilledAll::default();
        for s in Fleet::list(self)? {
            match Fleet::kill(self, &s.id) {
                Ok(()) => out.killed.push(s.id),
                Err(e) => out.failed.push((s.id, e.into())),
            }
        }
        out.orphans = self.kill_orphans()?;
        // What only the killed children mapped can go now.
        let _ = Fleet::gc(self);
        Ok(out)
    }

    fn exec(
        &self,
        id: &str,
        spec: &ExecSpec,
        stdin: Option<Box<dyn Read + Send>>,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, OpError> {
        if spec.argv.first().is_none_or(|a| a.is_empty()) {
            return Err(OpError::bad_input("name a command to run"));
        }
        let req = forkd_protocol::ExecRequest {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
            stdin: false,
        };
        let st = Fleet::exec(self, id, req, stdin, |s, b| {
            output(
                match s {
                    OutputStream::Stdout => Stream::Stdout,
                    OutputStream::Stderr => Stream::Stderr,
                },
                b,
            )
        })?;
        Ok(ExecOutcome {
            code: st.code,
            signal: st.signal,
            timed_out: st.timed_out,
            duration_ms: st.duration_ms,
        })
    }

    fn eval(&self, id: &str, code: &str) -> Result<EvalOutcome, OpError> {
        let req = forkd_protocol::ExecRequest {
            argv: vec!["python3".into(), "-c".into(), code.into()],
            env: vec![],
            cwd: None,
            timeout_ms: Some(EVAL_TIMEOUT.as_millis() as u64),
            stdin: false,
        };
        let no_python = |detail: String| CoreError::NoPython {
            id: id.into(),
            detail,
        };
        let out = self
            .with_agent(id, "an eval", |agent| agent.exec_collect(req, None))
            .map_err(|e| match e {
                e @ CoreError::Vm(forkd_vm::VmError::Agent(
                    forkd_protocol::client::ClientError::Agent(_),
                )) => no_python(e.to_string()),
                other => other,
            })?;
        let exit_code = out.status.shell_code();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if exit_code == 127 {
            return Err(no_python(stderr.trim().to_string()).into());
        }
        Ok(EvalOutcome {
            result: Some(String::from_utf8_lossy(&out.stdout).into_owned()),
            error: (exit_code != 0).then_some(stderr),
            exit_code,
        })
    }

    fn ping(&self, id: &str) -> Result<Pong, OpError> {
        let rtt = Fleet::ping(self, id)?;
        Ok(Pong {
            rtt_us: rtt.as_micros() as u64,
        })
    }

    fn write_file(
        &self,
        id: &str,
        path: &str,
        mode: Option<u32>,
        data: &mut dyn Read,
    ) -> Result<u64, OpError> {
        Ok(Fleet::write_file(self, id, path, mode, data)?)
    }

    fn read_file(&self, id: &str, path: &str, out: &mut dyn Write) -> Result<u64, OpError> {
        Ok(Fleet::read_file(self, id, path, out)?)
    }

    fn branch(&self, req: &BranchRequest) -> Result<BranchOutcome, OpError> {
        let tag = match &req.tag {
            Some(t) => t.clone(),
            None => policy::default_branch_tag(&req.source, crate::fleet::unix_now_ms()),
        };
        Ok(Fleet::branch(
            self,
            &req.source,
            &tag,
            req.mode.unwrap_or(policy::BRANCH_MODE),
            req.wait.unwrap_or(policy::BRANCH_WAITS),
            req.expect_parent.as_deref(),
        )?)
    }

    fn spawn(&self, req: &SpawnRequest, on_child: OnChild<'_>) -> Result<SpawnOutcome, OpError> {
        policy::check_children("the number of children", req.n, 1)?;
        if let Some(k) = req.pool {
            policy::check_children("the pool size", k, 0)?;
        }
        let t = Instant::now();
        let cores = std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1);
        let results = Fleet::spawn(
            self,
            &req.tag,
            req.n,
            policy::spawn_parallelism(req.n, req.parallel, cores),
            req.wait.unwrap_or(policy::SPAWN_WAITS_FOR_WRITING),
            req.on_failure.unwrap_or(policy::PARTIAL_FAILURE),
            &|i, r: &Result<Child, CoreError>| {
                let r = match r {
                    Ok(c) => Ok(c.clone()),
                    Err(e) => Err(OpError::from(e)),
                };
                on_child(i, &r)
            },
        )?;
        let wall_ms = t.elapsed().as_secs_f64() * 1000.0;
        if let Some(size) = req.pool {
            self.refill_pool(&req.tag, size)?;
        }
        Ok(SpawnOutcome {
            tag: req.tag.clone(),
            wall_ms,
            children: results
                .into_iter()
                .map(|r| r.map_err(OpError::from))
                .collect(),
        })
    }

    fn pool(&self, tag: &str, size: usize) -> Result<PoolStatus, OpError> {
        policy::check_children("the pool size", size, 0)?;
        let fill = self.fill_pool(tag, size)?;
        Ok(PoolStatus {
            size,
            started: fill.started,
            ready: fill.ready,
        })
    }

    fn snapshots(&self) -> Result<Vec<Snapshot>, OpError> {
        Ok(Fleet::snapshots(self)?)
    }

    fn snapshot_info(&self, tag: &str) -> Result<SnapshotDetail, OpError> {
        Ok(self.snapshot_detail(tag)?)
    }

    fn remove_snapshot(&self, tag: &str, opts: RemoveSnapshot) -> Result<Vec<String>, OpError> {
        Ok(Fleet::remove_snapshot(self, tag, opts)?)
    }

    fn prune_snapshots(&self) -> Result<Pruned, OpError> {
        Ok(Fleet::prune_snapshots(self)?)
    }

    fn gc(&self) -> Result<GcReport, OpError> {
        Ok(Fleet::gc(self)?)
    }
}

impl Fleet {
    /// Refills a snapshot's warm pool after a spawn took from it: in a
    /// detached helper when this process can host one (the caller need not
    /// wait for QEMUs to start), else right here.
    fn refill_pool(&self, tag: &str, size: usize) -> Result<(), CoreError> {
        if helper::can_host() {
            return helper::start(&Job::FillPool {
                home: self.env().home.clone(),
                runtime: self.env().runtime.clone(),
                tag: tag.to_string(),
                size,
            });
        }
        self.fill_pool(tag, size).map(drop)
    }
}
