//! `forkd image build | ls | rm`: the guest images of this host (built from
//! a recipe, a directory or a container image). Local only,
//! like `run` and `doctor`: images are files of this home that a daemon's
//! caller cannot see.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use forkd_core::images::RootfsRecipe;
use forkd_core::{images, Env, Fleet};

use crate::commands::{age, human_bytes};
use crate::progress;

/// What `image build` makes a root image from, besides `--image`.
pub struct BuildFrom {
    /// A directory holding the guest's root tree.
    pub dir: Option<PathBuf>,
    /// A container image (`REF`, `oci-archive:PATH`, ...).
    pub container: Option<String>,
    /// Extra Debian packages (debian-python only).
    pub packages: Vec<String>,
}

/// `forkd image build`: kernel, initramfs and root image, built or found in
/// the cache; prints their paths and the root image's name for `--image`.
pub fn build(opts: &forkd_core::ArtifactOptions, from: &BuildFrom, json: bool) -> Result<ExitCode> {
    let env = Env::from_process();
    let t0 = Instant::now();
    let mut opts = opts.clone();
    let mut container = None;
    if let Some(text) = &from.container {
        let source =
            images::ImageSource::parse(text).map_err(|e| crate::exit::Usage(e.to_string()))?;
        let built = images::build_from_container(
            &env,
            &source,
            &images::registry_options(opts.insecure_registry),
            &progress,
        )
        .map_err(forkd_ops::OpError::from)?;
        progress(&if built.cached {
            format!(
                "{} ({}) was built already: {}",
                source, built.defaults.digest, built.name
            )
        } else {
            format!(
                "built {} from {} ({})",
                built.name, source, built.defaults.digest
            )
        });
        opts.image = forkd_core::Image::Named(built.name.clone());
        container = Some(built);
    } else if let Some(dir) = &from.dir {
        let name =
            images::build_from_dir(&env, dir, &progress).map_err(forkd_ops::OpError::from)?;
        opts.image = forkd_core::Image::Named(name);
    } else if !from.packages.is_empty() {
        let forkd_core::Image::Recipe(recipe @ RootfsRecipe::DebianPython) = opts.image else {
            return Err(crate::exit::Usage(format!(
                "--packages needs --image debian-python, not {}",
                opts.image
            ))
            .into());
        };
        let name = images::build_with_packages(&env, recipe, &from.packages, &progress)
            .map_err(forkd_ops::OpError::from)?;
        opts.image = forkd_core::Image::Named(name);
    }
    let a =
        forkd_core::artifacts::ensure(&env, &opts, &progress).map_err(forkd_ops::OpError::from)?;
    let took = t0.elapsed();
    let image_name = a.rootfs.as_deref().map(images::name_of);
    if json {
        let v = serde_json::json!({
            "kernel": a.kernel.vmlinuz, "kernel_version": a.kernel.version,
            "initramfs": a.initramfs, "rootfs": a.rootfs, "image": image_name,
            "seconds": took.as_secs_f64(),
        });
        let mut v = v;
        if let Some(c) = &container {
            v["from"] = serde_json::json!({
                "source": c.defaults.source, "digest": c.defaults.digest,
                "cached": c.cached, "env": c.defaults.env,
                "cwd": c.defaults.cwd, "user": c.defaults.user,
            });
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "kernel     {} ({})",
            a.kernel.vmlinuz.display(),
            a.kernel.version
        );
        println!("initramfs  {}", a.initramfs.display());
        match &a.rootfs {
            Some(r) => println!("rootfs     {}", r.display()),
            None => println!("rootfs     none"),
        }
        let named = from.dir.is_some() || from.container.is_some() || !from.packages.is_empty();
        if let (Some(name), true) = (&image_name, named) {
            println!("image      {name}    (forkd create --image {name})");
        }
        if let Some(c) = &container {
            let d = &c.defaults;
            println!(
                "defaults   {} env var(s), cwd {}, user {}",
                d.env.len(),
                d.cwd.as_deref().unwrap_or("/"),
                d.user.as_deref().unwrap_or("root")
            );
        }
        eprintln!("forkd: ready in {:.1} s", took.as_secs_f64());
    }
    Ok(ExitCode::SUCCESS)
}

/// `forkd image ls`.
pub fn ls(json: bool) -> Result<ExitCode> {
    let fleet = Fleet::open(&Env::from_process())?;
    let list = images::list(&fleet).map_err(forkd_ops::OpError::from)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = forkd_store::unix_now();
    println!(
        "{:<48} {:<14} {:>10} {:>10} {:>6}  USED BY",
        "NAME", "KIND", "DISK", "SIZE", "AGE"
    );
    for i in &list {
        println!(
            "{:<48} {:<14} {:>10} {:>10} {:>6}  {}",
            i.name,
            i.kind,
            human_bytes(i.disk_bytes),
            human_bytes(i.size_bytes),
            age(now.saturating_sub(i.modified)),
            if i.used_by.is_empty() {
                "-".to_string()
            } else {
                i.used_by.join(", ")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `forkd image rm NAME...`: each is refused while a sandbox or snapshot
/// backs onto it.
pub fn rm(names: &[String], json: bool) -> Result<ExitCode> {
    let fleet = Fleet::open(&Env::from_process())?;
    let mut removed = Vec::new();
    let mut failed: Vec<(String, forkd_ops::OpError)> = Vec::new();
    for name in names {
        match images::remove(&fleet, name) {
            Ok(entry) => removed.push(entry),
            Err(e) => failed.push((name.clone(), e.into())),
        }
    }
    if json {
        let failed: Vec<serde_json::Value> = failed
            .iter()
            .map(|(n, e)| serde_json::json!({ "name": n, "error": crate::hints::render(e) }))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "removed": removed, "failed": failed })
        );
    } else {
        for r in &removed {
            println!("{}", r.name);
        }
        for (_, e) in &failed {
            let fix = match e.kind {
                forkd_ops::ErrorKind::NotFound => "; `forkd image ls` lists them",
                forkd_ops::ErrorKind::Busy => {
                    "; kill those sandboxes and delete those snapshots (`forkd rmi`) first"
                }
                _ => "",
            };
            eprintln!("forkd: error: {}{fix}", crate::hints::render(e));
        }
    }
    Ok(crate::exit::of_items(
        removed.len(),
        failed.first().map(|(_, e)| e),
    ))
}
