//! Builds a root image by hand: `cargo run -p forkd-guest --example build_rootfs -- HOME RECIPE`.

use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let home = PathBuf::from(args.next().ok_or("usage: build_rootfs HOME RECIPE")?);
    let recipe = args.next().unwrap_or_else(|| "busybox".into()).parse()?;
    let busybox = forkd_guest::find_busybox()?;
    let start = Instant::now();
    let image = forkd_guest::build_rootfs(&home, recipe, &busybox, &|line| eprintln!("{line}"))?;
    let size = std::fs::metadata(&image)?.len();
    println!(
        "{} ({} MiB) in {:.1?}",
        image.display(),
        size >> 20,
        start.elapsed()
    );
    Ok(())
}
