//! Credentials from Docker's config file, found through `$DOCKER_CONFIG`
//! as `docker login` writes it. Its own test binary: it sets an environment
//! variable, which no other test in the process may race with.

mod common;

use base64::Engine as _;
use common::{Auth, TestRegistry, PASSWORD, USER};
use forkd_oci::{ClientOptions, OciError, Registry};

#[test]
fn docker_config_credentials_are_used() {
    let registry = TestRegistry::start(Auth::Htpasswd);
    let dir = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    std::fs::write(
        dir.path().join("config.json"),
        format!(
            r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    std::env::set_var("DOCKER_CONFIG", dir.path());
    let options = ClientOptions {
        docker_config: true,
        ..registry.options(None)
    };
    Registry::new(&registry.host(), options.clone())
        .unwrap()
        .ping()
        .unwrap();

    // Without the config: asked for credentials, told how to provide them.
    std::env::set_var("DOCKER_CONFIG", dir.path().join("missing"));
    let e = Registry::new(&registry.host(), options.clone())
        .unwrap()
        .ping()
        .unwrap_err();
    assert!(matches!(e, OciError::NoCredentials { .. }), "{e}");

    // A broken config is reported with its path.
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    std::env::set_var("DOCKER_CONFIG", dir.path());
    let e = Registry::new(&registry.host(), options).err().unwrap();
    assert!(e.to_string().contains("config.json"), "{e}");
}
