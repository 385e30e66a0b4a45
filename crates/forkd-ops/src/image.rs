//! What a create's image string means, decided once for every front end and
//! for forkd-core: a container image in a registry, a container image in a
//! file or directory of the host that runs the operation, or something else
//! (a built-in recipe, an image built there, a raw image file). Pure.

/// Transports that name a container image kept in a file or directory.
const HOST_TRANSPORTS: [&str; 4] = ["oci-archive:", "docker-archive:", "oci-layout:", "oci:"];
/// The optional transport of a registry reference.
pub const REGISTRY_TRANSPORT: &str = "docker://";

/// How an image string is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// A container image in a registry (`HOST/REPO:TAG`, `docker://REF`).
    Registry,
    /// A container image in a file or directory of the host that runs the
    /// operation (`oci-archive:PATH`, `docker-archive:PATH`, `oci-layout:DIR`).
    HostContainer,
    /// Not a container image: a recipe, an image built there, or a file.
    Other,
}

/// Whether `s` is meant as a container image rather than a file: an
/// explicit transport prefix, or a registry reference whose first component
/// is a registry host (has a `.` or a `:` port, or is `localhost`, Docker's
/// own rule) or which carries a tag or digest (`ubuntu:24.04`). A plain
/// relative path (`images/root`) stays a file.
pub fn image_kind(s: &str) -> ImageKind {
    if HOST_TRANSPORTS.iter().any(|p| s.starts_with(p)) {
        return ImageKind::HostContainer;
    }
    if s.starts_with(REGISTRY_TRANSPORT) {
        return ImageKind::Registry;
    }
    if s.starts_with(['/', '.', '~']) || s.ends_with(".ext4") || s.ends_with(".img") {
        return ImageKind::Other;
    }
    let last = s.rsplit('/').next().unwrap_or(s);
    let registry = match s.split_once('/') {
        Some((host, _)) => {
            host.contains(['.', ':']) || host == "localhost" || last.contains([':', '@'])
        }
        None => last.contains([':', '@']),
    };
    if registry {
        ImageKind::Registry
    } else {
        ImageKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_references_host_containers_and_files_are_told_apart() {
        use ImageKind::*;
        for (text, kind) in [
            ("127.0.0.1:5000/team/app:v1", Registry),
            ("localhost/app", Registry),
            ("registry.example.com/app", Registry),
            ("ubuntu:24.04", Registry),
            ("team/app@sha256:abcd", Registry),
            ("docker://busybox", Registry),
            ("oci-archive:/tmp/a.tar", HostContainer),
            ("docker-archive:a.tar", HostContainer),
            ("oci-layout:./dir", HostContainer),
            ("oci:dir", HostContainer),
            ("images/root", Other),
            ("./my.ext4", Other),
            ("/srv/root.img", Other),
            ("/srv/images/app:v1", Other),
            ("busybox", Other),
            ("debian-python", Other),
        ] {
            assert_eq!(image_kind(text), kind, "{text}");
        }
    }
}
