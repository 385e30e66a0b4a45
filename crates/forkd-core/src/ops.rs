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
    ExecOutcome, ExecSpec, FileInfo, FsEvent, GcReport, KilledAll, Network, OnChild, OpError,
    Operations, Pong, PoolStatus, ProcessEvent, ProcessInfo, ProcessRef, ProcessSpec, Pruned,
    PtySize, RemoveSnapshot, Sandbox, Snapshot, SnapshotDetail, SpawnOutcome, SpawnRequest, Stream,
    TarSummary, WriteOptions,
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
            Network::Default => forkd_vm::Network::Gateway,
            Network::None | Network::Slirp => forkd_vm::Network::None,
        },
        egress: forkd_vm::Egress {
            deny_all: false,
            allow_out: req.allow_out.clone(),
            deny_out: req.deny_out.clone(),
        },
        limits: forkd_vm::Limits {
            memory_limit_mib: req.memory_limit_mib,
            cpu_quota_pct: req.cpu_quota_pct,
        },
        tcg_tb_mib: req.tcg_tb_mib,
        prealloc: req.prealloc,
        ..BootOptions::default()
    }
}

impl Operations for Fleet {
    fn create(&self, req: &CreateRequest, progress: &dyn Fn(&str)) -> Result<Created, OpError> {
        if req.network == Some(Network::Slirp) {
            return Err(OpError::bad_input(
                "network slirp cannot be asked for: use default (filtered) or none",
            ));
        }
        let requested = req.image.as_deref().unwrap_or(policy::IMAGE);
        let image: Image = requested.parse().map_err(OpError::bad_input)?;
        if let Some(tag) = &req.snapshot_as {
            forkd_ops::validate_tag(tag)?;
        }
        req.settings.validate()?;
        let artifacts = crate::artifacts::ensure(
            self.env(),
            &ArtifactOptions {
                kernel: req.guest.kernel.clone(),
                modules: req.guest.modules.clone(),
                agent: req.guest.agent.clone(),
                image,
                insecure_registry: req.insecure_registry,
            },
            progress,
        )?;
        // An image built from a container image brings its Env, WorkingDir
        // and User; the request's own settings win over them.
        let mut settings = req.settings.clone();
        if let Some(defaults) = &artifacts.defaults {
            defaults.apply_to(&mut settings);
            settings.validate()?;
        }
        let name = artifacts.image_name.as_deref().unwrap_or(requested);
        let mut opts = boot_options(req);
        let (pages, note) = crate::hugepool::choose(
            req.huge_pages,
            req.prealloc,
            opts.mem_mib,
            crate::hugepool::unavailable(),
        );
        opts.huge_pages = pages;
        if let Some(note) = note {
            progress(&note);
        }
        let (sandbox, boot) = Fleet::create(self, &artifacts, name, &opts)?;
        if let Err(e) = self.start_lifetime(&sandbox.id, &settings) {
            let _ = Fleet::kill(self, &sandbox.id);
            return Err(e.into());
        }
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

    fn set_timeout(&self, id: &str, ttl: Option<Duration>) -> Result<Sandbox, OpError> {
        Fleet::set_timeout(self, id, ttl)?;
        Ok(self.sandbox_view(id)?)
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
        let (mut env, mut cwd, mut user) = (spec.env.clone(), spec.cwd.clone(), None);
        let lifetime = self.lifetime(id)?;
        lifetime.apply(&mut env, &mut cwd);
        lifetime.apply_user(&mut user);
        let req = forkd_protocol::ExecRequest {
            argv: spec.argv.clone(),
            env,
            cwd,
            timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
            stdin: false,
            user,
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

    fn eval(
        &self,
        id: &str,
        code: &str,
        timeout: Option<Duration>,
    ) -> Result<EvalOutcome, OpError> {
        Ok(self.guest_eval(id, code, timeout)?)
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
        opts: &WriteOptions,
        data: &mut dyn Read,
    ) -> Result<u64, OpError> {
        Ok(self.guest_write(id, path, opts, data)?)
    }

    fn read_file(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        out: &mut dyn Write,
    ) -> Result<u64, OpError> {
        Ok(self.guest_read(id, path, user, out)?)
    }

    fn stat(&self, id: &str, path: &str, user: Option<&str>) -> Result<FileInfo, OpError> {
        Ok(self.guest_stat(id, path, user)?)
    }

    fn list_dir(
        &self,
        id: &str,
        path: &str,
        depth: u32,
        user: Option<&str>,
    ) -> Result<Vec<FileInfo>, OpError> {
        Ok(self.guest_list(id, path, depth, user)?)
    }

    fn make_dir(&self, id: &str, path: &str, user: Option<&str>) -> Result<bool, OpError> {
        Ok(self.guest_mkdir(id, path, user)?)
    }

    fn remove_path(&self, id: &str, path: &str, user: Option<&str>) -> Result<(), OpError> {
        Ok(self.guest_remove(id, path, user)?)
    }

    fn rename_path(
        &self,
        id: &str,
        from: &str,
        to: &str,
        user: Option<&str>,
    ) -> Result<FileInfo, OpError> {
        Ok(self.guest_rename(id, from, to, user)?)
    }

    fn copy_in(
        &self,
        id: &str,
        dir: &str,
        user: Option<&str>,
        tar: &mut dyn Read,
    ) -> Result<TarSummary, OpError> {
        Ok(self.guest_copy_in(id, dir, user, tar)?)
    }

    fn copy_out(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        tar: &mut dyn Write,
    ) -> Result<TarSummary, OpError> {
        Ok(self.guest_copy_out(id, path, user, tar)?)
    }

    fn watch_dir(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
        user: Option<&str>,
    ) -> Result<u32, OpError> {
        Ok(self.guest_watch(id, path, recursive, user)?)
    }

    fn watch_events(&self, id: &str, watch: u32, wait: Duration) -> Result<Vec<FsEvent>, OpError> {
        Ok(self.guest_watch_events(id, watch, wait)?)
    }

    fn unwatch(&self, id: &str, watch: u32) -> Result<(), OpError> {
        Ok(self.guest_unwatch(id, watch)?)
    }

    fn run_process(
        &self,
        id: &str,
        spec: &ProcessSpec,
        on_event: &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<ExecOutcome>, OpError> {
        let mut spec = spec.clone();
        let lifetime = self.lifetime(id)?;
        lifetime.apply(&mut spec.env, &mut spec.cwd);
        lifetime.apply_user(&mut spec.user);
        Ok(self.guest_run(id, &spec, on_event)?)
    }

    fn follow_process(
        &self,
        id: &str,
        process: &ProcessRef,
        replay: bool,
        on_event: &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<ExecOutcome>, OpError> {
        Ok(self.guest_follow(id, process, replay, on_event)?)
    }

    fn process_input(
        &self,
        id: &str,
        process: &ProcessRef,
        data: &[u8],
        close: bool,
    ) -> Result<(), OpError> {
        Ok(self.guest_input(id, process, data, close)?)
    }

    fn signal_process(&self, id: &str, process: &ProcessRef, signal: i32) -> Result<(), OpError> {
        Ok(self.guest_signal(id, process, signal)?)
    }

    fn resize_process(&self, id: &str, process: &ProcessRef, size: PtySize) -> Result<(), OpError> {
        Ok(self.guest_resize(id, process, size)?)
    }

    fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, OpError> {
        Ok(self.guest_processes(id)?)
    }

    fn code_interpreter(&self, id: &str, port: u16) -> Result<u32, OpError> {
        Ok(self.guest_code_interpreter(id, port)?)
    }

    fn connect_port(&self, id: &str, port: u16) -> Result<forkd_ops::PortConn, OpError> {
        Ok(self.guest_connect_port(id, port)?)
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
        req.settings.validate()?;
        // The children of a sandbox created from a container image keep
        // its defaults, under the request's own.
        let mut settings = req.settings.clone();
        if let Some(defaults) = crate::images::defaults_of_snapshot(self, &req.tag) {
            defaults.apply_to(&mut settings);
            settings.validate()?;
        }
        // One lifetime for every child, counted from the request.
        let life = settings
            .shapes_lifetime()
            .then(|| forkd_ops::Lifetime::start(&settings, crate::fleet::lifetime::now_ms()));
        // Slots whose child was killed because its lifetime could not be
        // recorded: they are failures, whatever the spawn itself says.
        let lost: std::sync::Mutex<Vec<(usize, OpError)>> = Default::default();
        let with_life = |c: &Child| -> Result<Child, CoreError> {
            let mut c = c.clone();
            self.write_access_token(&c.sandbox.id, &req.settings)?;
            c.sandbox.access_token = req.settings.access_token.clone();
            if let Some(life) = &life {
                self.write_lifetime(&c.sandbox.id, life)?;
                c.sandbox.lifetime = life.clone();
            }
            Ok(c)
        };
        if let Some(k) = req.pool {
            policy::check_children("the pool size", k, 0)?;
        }
        let t = Instant::now();
        let cores = std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1);
        let overrides = crate::fleet::ChildOverrides {
            network: req.network,
            allow_out: req.allow_out.clone(),
            deny_out: req.deny_out.clone(),
            memory_limit_mib: req.memory_limit_mib,
            cpu_quota_pct: req.cpu_quota_pct,
            id: req.id.clone(),
            huge_pages: req.huge_pages.unwrap_or(policy::CHILD_HUGE_PAGES),
        };
        let results = Fleet::spawn_with(
            self,
            &req.tag,
            req.n,
            policy::spawn_parallelism(req.n, req.parallel, cores),
            req.wait.unwrap_or(policy::SPAWN_WAITS_FOR_WRITING),
            req.on_failure.unwrap_or(policy::PARTIAL_FAILURE),
            &overrides,
            &|i, r: &Result<Child, CoreError>| {
                let r = match r {
                    Ok(c) => with_life(c).map_err(|e| {
                        // A child that cannot keep its lifetime must not
                        // live on without it.
                        let _ = Fleet::kill(self, &c.sandbox.id);
                        let e = OpError::from(&e);
                        lost.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((i, e.clone()));
                        e
                    }),
                    Err(e) => Err(OpError::from(e)),
                };
                on_child(i, &r)
            },
        )?;
        let wall_ms = t.elapsed().as_secs_f64() * 1000.0;
        let lost = lost.into_inner().unwrap_or_else(|p| p.into_inner());
        let lost_slot = |i: usize| lost.iter().find(|(j, _)| *j == i).map(|(_, e)| e.clone());
        if let Some(size) = req.pool {
            self.refill_pool(&req.tag, size)?;
        }
        Ok(SpawnOutcome {
            tag: req.tag.clone(),
            wall_ms,
            children: results
                .into_iter()
                .enumerate()
                .map(|(i, r)| match (r, lost_slot(i)) {
                    (_, Some(e)) => Err(e),
                    (Ok(mut c), None) => {
                        c.sandbox.access_token = req.settings.access_token.clone();
                        if let Some(life) = &life {
                            c.sandbox.lifetime = life.clone();
                        }
                        Ok(c)
                    }
                    (Err(e), None) => Err(OpError::from(e)),
                })
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

    fn compact(&self, tag: &str) -> Result<forkd_ops::Compacted, OpError> {
        Ok(Fleet::compact(self, tag)?)
    }

    fn prune_snapshots(&self) -> Result<Pruned, OpError> {
        Ok(Fleet::prune_snapshots(self)?)
    }

    fn gc(&self) -> Result<GcReport, OpError> {
        Ok(Fleet::gc(self)?)
    }

    fn push(
        &self,
        req: &forkd_ops::PushRequest,
        progress: forkd_ops::OnTransfer<'_>,
    ) -> Result<forkd_ops::PushOutcome, OpError> {
        self.push_snapshot(req, progress)
            .map_err(crate::transfer::op_error)
    }

    fn pull(
        &self,
        req: &forkd_ops::PullRequest,
        progress: forkd_ops::OnTransfer<'_>,
    ) -> Result<forkd_ops::PullOutcome, OpError> {
        self.pull_snapshot(req, progress)
            .map_err(crate::transfer::op_error)
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
