//! Accounts in the guest: who a request runs as.
//!
//! Parses the guest's `/etc/passwd` and `/etc/group` (pure functions over
//! their text) and resolves a request's `user` field — a name, `UID` or
//! `UID:GID` — to the ids, supplementary groups and home directory to use.
//! [`act_as`] switches the *calling thread's* filesystem identity
//! (`setfsuid`/`setfsgid`/`setgroups` as raw per-thread syscalls), which is
//! how file operations run with the user's permissions and create files it
//! owns without touching the rest of the agent.

use std::io;

/// A resolved account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Its name, or the uid in decimal when it has none.
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from `/etc/group`), the primary one included.
    pub groups: Vec<u32>,
    pub home: String,
}

impl User {
    pub fn root() -> User {
        User {
            name: "root".into(),
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: "/root".into(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Entries of a passwd file; malformed lines are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].into(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].into(),
            })
        })
        .collect()
}

/// Entries of a group file; malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0].is_empty() {
                return None;
            }
            Some(GroupEntry {
                name: f[0].into(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(Into::into)
                    .collect(),
            })
        })
        .collect()
}

/// Why a user could not be resolved.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownUser(pub String);

/// Resolves `spec` (a name, `UID` or `UID:GID`) against the given account
/// databases. A numeric uid that has no entry is accepted as it is (home
/// `/`, primary group = `GID` or the uid).
pub fn resolve(
    spec: &str,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<User, UnknownUser> {
    let (who, gid_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let explicit_gid = match gid_part {
        Some(g) => Some(
            g.parse::<u32>()
                .map_err(|_| UnknownUser(format!("{spec:?} is not NAME, UID or UID:GID")))?,
        ),
        None => None,
    };
    let entry = match who.parse::<u32>() {
        Ok(uid) => passwd
            .iter()
            .find(|p| p.uid == uid)
            .cloned()
            .or(Some(PasswdEntry {
                name: uid.to_string(),
                uid,
                gid: explicit_gid.unwrap_or(uid),
                home: "/".into(),
            })),
        Err(_) => passwd.iter().find(|p| p.name == who).cloned(),
    };
    let Some(entry) = entry else {
        return Err(UnknownUser(format!(
            "no user {who:?} in the guest's /etc/passwd"
        )));
    };
    let gid = explicit_gid.unwrap_or(entry.gid);
    let mut ids = vec![gid];
    for g in groups {
        if g.members.contains(&entry.name) && !ids.contains(&g.gid) {
            ids.push(g.gid);
        }
    }
    Ok(User {
        name: entry.name,
        uid: entry.uid,
        gid,
        groups: ids,
        home: if entry.home.is_empty() {
            "/".into()
        } else {
            entry.home
        },
    })
}

/// Reads the account databases of the filesystem this thread sees (inside
/// the guest's root for the agent's request threads). Missing files are
/// empty.
pub fn databases() -> (Vec<PasswdEntry>, Vec<GroupEntry>) {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    (
        parse_passwd(&read("/etc/passwd")),
        parse_group(&read("/etc/group")),
    )
}

/// Resolves the request's `user` (root when `None`) in this thread's root.
pub fn lookup(spec: Option<&str>) -> Result<User, UnknownUser> {
    match spec {
        None | Some("root") | Some("0") => Ok(User::root()),
        Some(s) => {
            let (passwd, groups) = databases();
            resolve(s, &passwd, &groups)
        }
    }
}

/// Names for ids, for `FileInfo::owner` and `group`.
#[derive(Debug, Default)]
pub struct Names {
    passwd: Vec<PasswdEntry>,
    groups: Vec<GroupEntry>,
}

impl Names {
    /// The names of this thread's root.
    pub fn load() -> Names {
        let (passwd, groups) = databases();
        Names { passwd, groups }
    }

    pub fn user(&self, uid: u32) -> String {
        self.passwd
            .iter()
            .find(|p| p.uid == uid)
            .map_or_else(|| uid.to_string(), |p| p.name.clone())
    }

    pub fn group(&self, gid: u32) -> String {
        self.groups
            .iter()
            .find(|g| g.gid == gid)
            .map_or_else(|| gid.to_string(), |g| g.name.clone())
    }
}

/// Makes the calling thread access files as `user`: its fsuid, fsgid and
/// supplementary groups. Only this thread changes (raw syscalls, not libc's
/// process-wide wrappers); a thread that called this must not be reused for
/// other users' work. Leaving uid 0 drops the file capabilities
/// (`CAP_DAC_OVERRIDE`, `CAP_CHOWN`, ...) from this thread, so the kernel
/// checks the user's permissions.
pub fn act_as(user: &User) -> io::Result<()> {
    if user.is_root() {
        return Ok(());
    }
    let groups: Vec<libc::gid_t> = user.groups.clone();
    // SAFETY: setgroups reads `groups.len()` gids from a valid buffer; it
    // only changes this thread's credentials (raw syscall).
    let r = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::c_long,
            groups.as_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setfsgid/setfsuid take an id and change only this thread's
    // filesystem ids; they return the previous id and cannot fail in a way
    // errno reports, so the result is checked by asking again below.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, user.gid as libc::c_long);
        libc::syscall(libc::SYS_setfsuid, user.uid as libc::c_long);
    }
    // setfsuid(-1) fails and returns the current fsuid: a cheap check.
    // SAFETY: as above.
    let now = unsafe { libc::syscall(libc::SYS_setfsuid, -1 as libc::c_long) };
    if now as u32 != user.uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("could not switch file access to uid {}", user.uid),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        user:x:1000:1000::/home/user:/bin/bash\n\
        broken line\n\
        svc:x:998:997:service:/var/lib/svc:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nuser:x:1000:\nwheel:x:10:user,other\naudio:x:29:user\nbad\n";

    #[test]
    fn parses_and_resolves_names_and_ids() {
        let p = parse_passwd(PASSWD);
        let g = parse_group(GROUP);
        assert_eq!(p.len(), 3);
        assert_eq!(g.len(), 4);
        let u = resolve("user", &p, &g).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1000, 1000, "/home/user"));
        assert_eq!(u.groups, vec![1000, 10, 29]);
        let u = resolve("1000", &p, &g).unwrap();
        assert_eq!(u.name, "user");
        let u = resolve("998:5", &p, &g).unwrap();
        assert_eq!((u.name.as_str(), u.uid, u.gid), ("svc", 998, 5));
        // An id with no entry is taken as it is.
        let u = resolve("4242", &p, &g).unwrap();
        assert_eq!(
            (u.name.as_str(), u.uid, u.gid, u.home.as_str()),
            ("4242", 4242, 4242, "/")
        );
        assert!(resolve("nobody-here", &p, &g).is_err());
        assert!(resolve("user:x", &p, &g).is_err());
    }

    #[test]
    fn names_fall_back_to_numbers() {
        let n = Names {
            passwd: parse_passwd(PASSWD),
            groups: parse_group(GROUP),
        };
        assert_eq!(n.user(1000), "user");
        assert_eq!(n.user(5), "5");
        assert_eq!(n.group(29), "audio");
        assert_eq!(n.group(77), "77");
    }
}
