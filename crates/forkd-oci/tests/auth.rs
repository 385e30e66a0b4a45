//! Authentication against a real registry: htpasswd Basic auth (success,
//! no credentials, wrong password) and the bearer-token flow through a token
//! server, each with a message that names the registry and the fix.

mod common;

use std::sync::atomic::Ordering;

use common::{creds, token::TokenServer, Auth, TestRegistry, PASSWORD, USER};
use forkd_oci::fileset::{self, FileSpec, LocalSources, PullOptions, PushOptions};
use forkd_oci::{Credentials, Digest, OciError, Reference};

fn round_trip(registry: &TestRegistry, credentials: Option<Credentials>) -> Result<(), OciError> {
    let client = registry.client(credentials);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.bin");
    std::fs::write(&file, common::noise(700_000, 7)).unwrap();
    let r = Reference::parse(&format!("{}/team/app:v1", registry.host())).unwrap();
    fileset::push(
        &client,
        &r,
        b"{}",
        &[FileSpec::new("data.bin", &file)],
        &LocalSources::new(),
        &PushOptions::default(),
        &mut |_| {},
    )?;
    let staging = dir.path().join("staging");
    fileset::pull(
        &client,
        &r,
        &staging,
        &LocalSources::new(),
        &PullOptions::default(),
        &mut |_| {},
    )?;
    assert_eq!(
        std::fs::read(staging.join("data.bin")).unwrap(),
        std::fs::read(&file).unwrap()
    );
    Ok(())
}

#[test]
fn basic_auth_works_and_failures_say_what_to_do() {
    let registry = TestRegistry::start(Auth::Htpasswd);
    round_trip(&registry, Some(creds())).unwrap();
    registry.client(Some(creds())).ping().unwrap();

    let e = round_trip(&registry, None).unwrap_err();
    assert!(matches!(e, OciError::NoCredentials { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&registry.host()) && text.contains("docker login"),
        "{text}"
    );

    let e = round_trip(&registry, Some(Credentials::new(USER, "wrong"))).unwrap_err();
    assert!(matches!(e, OciError::Unauthorized { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(USER) && text.contains(&registry.host()) && !text.contains("wrong"),
        "{text}"
    );
}

#[test]
fn bearer_tokens_are_fetched_from_the_challenge_realm() {
    let server = TokenServer::start();
    let (issued, refused) = (server.issued.clone(), server.refused.clone());
    let registry = TestRegistry::start(Auth::Token(server));
    round_trip(&registry, Some(creds())).unwrap();
    let n = issued.load(Ordering::SeqCst);
    // One token per scope (push to the repo, then pull), not one per request.
    assert!((1..=4).contains(&n), "{n} tokens issued");

    let e = round_trip(&registry, Some(Credentials::new(USER, "nope"))).unwrap_err();
    assert!(matches!(e, OciError::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("token server"), "{e}");
    assert!(refused.load(Ordering::SeqCst) >= 1);

    let e = round_trip(&registry, None).unwrap_err();
    assert!(matches!(e, OciError::NoCredentials { .. }), "{e}");

    // A blob check with a token works too, and an absent blob is "absent", not an error.
    let client = registry.client(Some(Credentials::new(USER, PASSWORD)));
    assert_eq!(
        client
            .blob_size("team/app", &Digest::of(b"absent"))
            .unwrap(),
        None
    );
}
