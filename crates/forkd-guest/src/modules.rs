//! Kernel module index and dependency closure. `resolve_order` is the pure
//! resolver; `ModuleIndex` only adds the walk over a `lib/modules/<kver>` tree.
//! Nothing here loads modules or runs depmod.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::modinfo::parse_modinfo;
use crate::GuestError;

/// A module of the closure: its canonical name and its `.ko` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    pub name: String,
    pub path: PathBuf,
}

/// Module names use `_`; file names and some `depends=` entries use `-`.
pub fn canonical_module_name(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// What a modules dir holds: every `.ko` with its dependencies, and the
/// modules built into the kernel (`modules.builtin`).
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    dir: PathBuf,
    files: BTreeMap<String, PathBuf>,
    depends: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
    compressed: BTreeMap<String, PathBuf>,
}

impl ModuleIndex {
    /// Walks `modules_dir` (not following symlinks such as `build`), reads the
    /// `.modinfo` of every `.ko` and the `modules.builtin` list.
    pub fn scan(modules_dir: &Path) -> Result<Self, GuestError> {
        if !modules_dir.is_dir() {
            return Err(GuestError::ModulesDirMissing {
                path: modules_dir.to_owned(),
            });
        }
        let mut index = ModuleIndex {
            dir: modules_dir.to_owned(),
            files: BTreeMap::new(),
            depends: BTreeMap::new(),
            builtin: read_builtin(modules_dir)?,
            compressed: BTreeMap::new(),
        };
        let mut pending = vec![modules_dir.to_owned()];
        while let Some(dir) = pending.pop() {
            let mut entries = fs::read_dir(&dir)
                .map_err(GuestError::io("read modules dir", &dir))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(GuestError::io("read modules dir", &dir))?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let path = entry.path();
                let kind = entry.file_type().map_err(GuestError::io("stat", &path))?;
                if kind.is_dir() {
                    pending.push(path);
                    continue;
                }
                if !kind.is_file() {
                    continue;
                }
                let file_name = entry.file_name().to_string_lossy().into_owned();
                if let Some(stem) = file_name.strip_suffix(".ko") {
                    index.add_module(stem, path)?;
                } else if let Some((stem, _)) = file_name.split_once(".ko.") {
                    index
                        .compressed
                        .entry(canonical_module_name(stem))
                        .or_insert(path);
                }
            }
        }
        Ok(index)
    }

    fn add_module(&mut self, stem: &str, path: PathBuf) -> Result<(), GuestError> {
        let bytes = fs::read(&path).map_err(GuestError::io("read kernel module", &path))?;
        let info = parse_modinfo(&bytes).map_err(|e| match e {
            GuestError::InvalidElf { reason, .. } => GuestError::InvalidElf {
                what: path.display().to_string(),
                reason,
            },
            other => other,
        })?;
        let name = canonical_module_name(info.name.as_deref().unwrap_or(stem));
        if self.files.contains_key(&name) {
            // depmod also keeps one file per name; the first in walk order wins.
            return Ok(());
        }
        let deps = info
            .depends
            .iter()
            .map(|d| canonical_module_name(d))
            .collect();
        self.depends.insert(name.clone(), deps);
        self.files.insert(name, path);
        Ok(())
    }

    /// The dir this index was scanned from.
    pub fn modules_dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `name` is compiled into the kernel (needs no file).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&canonical_module_name(name))
    }

    /// The `.ko` files needed for `wanted`, dependencies first, each once,
    /// built-in modules skipped.
    pub fn closure(&self, wanted: &[&str]) -> Result<Vec<ModuleFile>, GuestError> {
        let order = resolve_order(&self.depends, &self.builtin, wanted).map_err(|e| match e {
            GuestError::UnknownModule { name, .. } if self.compressed.contains_key(&name) => {
                GuestError::CompressedModule {
                    path: self.compressed[&name].clone(),
                }
            }
            other => other,
        })?;
        Ok(order
            .into_iter()
            .filter_map(|name| {
                let path = self.files.get(&name)?.clone();
                Some(ModuleFile { name, path })
            })
            .collect())
    }
}

fn read_builtin(modules_dir: &Path) -> Result<BTreeSet<String>, GuestError> {
    let path = modules_dir.join("modules.builtin");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        // Custom trees may lack it; then nothing counts as built in.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(GuestError::io("read", path)(e)),
    };
    Ok(parse_builtin(&text))
}

/// Parses `modules.builtin` (one `kernel/.../name.ko` path per line).
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let file = line.rsplit('/').next().unwrap_or(line);
            canonical_module_name(file.strip_suffix(".ko").unwrap_or(file))
        })
        .collect()
}

/// Orders the closure of `wanted` over `graph` (module -> its dependencies):
/// dependencies before dependents, each module once, modules in `builtin`
/// skipped. Deterministic: follows `wanted` and each dependency list in order.
pub fn resolve_order(
    graph: &BTreeMap<String, Vec<String>>,
    builtin: &BTreeSet<String>,
    wanted: &[&str],
) -> Result<Vec<String>, GuestError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        InProgress,
        Done,
    }
    struct Walk<'g> {
        graph: &'g BTreeMap<String, Vec<String>>,
        builtin: &'g BTreeSet<String>,
        marks: BTreeMap<String, Mark>,
        stack: Vec<String>,
        order: Vec<String>,
    }
    impl Walk<'_> {
        fn visit(&mut self, name: String, needed_by: Option<&str>) -> Result<(), GuestError> {
            if self.builtin.contains(&name) {
                return Ok(());
            }
            match self.marks.get(&name) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::InProgress) => {
                    let start = self.stack.iter().position(|n| *n == name).unwrap_or(0);
                    let mut cycle = self.stack[start..].to_vec();
                    cycle.push(name);
                    return Err(GuestError::ModuleCycle { cycle });
                }
                None => {}
            }
            let Some(deps) = self.graph.get(&name) else {
                return Err(GuestError::UnknownModule {
                    name,
                    needed_by: needed_by.map(str::to_owned),
                });
            };
            self.marks.insert(name.clone(), Mark::InProgress);
            self.stack.push(name.clone());
            for dep in deps {
                self.visit(canonical_module_name(dep), Some(&name))?;
            }
            self.stack.pop();
            self.marks.insert(name.clone(), Mark::Done);
            self.order.push(name);
            Ok(())
        }
    }

    let mut walk = Walk {
        graph,
        builtin,
        marks: BTreeMap::new(),
        stack: Vec::new(),
        order: Vec::new(),
    };
    for name in wanted {
        walk.visit(canonical_module_name(name), None)?;
    }
    Ok(walk.order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(m, deps)| (m.to_string(), deps.iter().map(|d| d.to_string()).collect()))
            .collect()
    }

    fn builtin(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn chain_orders_dependencies_first() {
        let g = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &[])]);
        assert_eq!(
            resolve_order(&g, &builtin(&[]), &["a"]).unwrap(),
            ["c", "b", "a"]
        );
    }

    #[test]
    fn diamond_lists_shared_dependency_once() {
        let g = graph(&[
            ("top", &["left", "right"]),
            ("left", &["base"]),
            ("right", &["base"]),
            ("base", &[]),
        ]);
        let order = resolve_order(&g, &builtin(&[]), &["top", "left"]).unwrap();
        assert_eq!(order, ["base", "left", "right", "top"]);
    }

    #[test]
    fn builtin_modules_are_skipped_even_without_a_file() {
        let g = graph(&[("virtio_rng", &["rng_core", "virtio"]), ("virtio", &[])]);
        let order = resolve_order(&g, &builtin(&["rng_core", "ext4"]), &["virtio-rng", "ext4"]);
        assert_eq!(order.unwrap(), ["virtio", "virtio_rng"]);
    }

    #[test]
    fn unknown_module_is_named_with_its_dependent() {
        let g = graph(&[("virtio_net", &["net_failover"])]);
        let err = resolve_order(&g, &builtin(&[]), &["virtio_net"]).unwrap_err();
        match &err {
            GuestError::UnknownModule { name, needed_by } => {
                assert_eq!(name, "net_failover");
                assert_eq!(needed_by.as_deref(), Some("virtio_net"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err
            .to_string()
            .contains("`net_failover` (needed by `virtio_net`)"));
        let err = resolve_order(&g, &builtin(&[]), &["nope"]).unwrap_err();
        assert!(err.to_string().contains("`nope` is neither"), "{err}");
    }

    #[test]
    fn cycle_is_an_error_naming_the_loop() {
        let g = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        match resolve_order(&g, &builtin(&[]), &["a"]).unwrap_err() {
            GuestError::ModuleCycle { cycle } => assert_eq!(cycle, ["a", "b", "c", "a"]),
            other => panic!("unexpected {other:?}"),
        }
        let self_loop = graph(&[("a", &["a"])]);
        assert!(resolve_order(&self_loop, &builtin(&[]), &["a"]).is_err());
    }

    #[test]
    fn builtin_list_parses_paths_to_names() {
        let set =
            parse_builtin("kernel/fs/ext4/ext4.ko\nkernel/drivers/char/hw_random/rng-core.ko\n\n");
        assert_eq!(set, builtin(&["ext4", "rng_core"]));
    }

    #[test]
    fn scans_a_synthetic_modules_dir() {
        use crate::elf::tests::synthetic_elf;
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("kernel/drivers");
        fs::create_dir_all(&kdir).unwrap();
        let module = |name: &str, deps: &str| {
            let info = format!("depends={deps}\0name={name}\0");
            synthetic_elf(1, &[], &[(".modinfo", info.as_bytes())])
        };
        fs::write(
            kdir.join("virtio-rng.ko"),
            module("virtio_rng", "virtio,rng-core"),
        )
        .unwrap();
        fs::write(kdir.join("virtio.ko"), module("virtio", "")).unwrap();
        fs::write(kdir.join("zipped.ko.xz"), b"xz").unwrap();
        fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/rng-core.ko\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("build")).unwrap();

        let index = ModuleIndex::scan(dir.path()).unwrap();
        let closure = index.closure(&["virtio_rng"]).unwrap();
        let names: Vec<_> = closure.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["virtio", "virtio_rng"]);
        assert_eq!(closure[1].path, kdir.join("virtio-rng.ko"));
        assert!(index.is_builtin("rng-core"));
        assert!(matches!(
            index.closure(&["zipped"]),
            Err(GuestError::CompressedModule { .. })
        ));
    }

    #[test]
    fn real_debian_closure_when_present() {
        let Ok(dirs) = fs::read_dir("/tmp/k/x/lib/modules") else {
            return;
        };
        for dir in dirs.flatten() {
            let index = ModuleIndex::scan(&dir.path()).unwrap();
            let closure = index.closure(crate::GUEST_MODULES).unwrap();
            let names: Vec<_> = closure.iter().map(|m| m.name.as_str()).collect();
            let pos = |n: &str| names.iter().position(|m| *m == n).unwrap();
            assert!(pos("virtio_ring") < pos("virtio"));
            assert!(pos("virtio") < pos("virtio_mmio"));
            assert!(pos("failover") < pos("net_failover"));
            assert!(pos("net_failover") < pos("virtio_net"));
            assert!(names.contains(&"virtio_rng"));
            assert!(!names.contains(&"rng_core"), "rng_core is built in");
        }
    }
}
