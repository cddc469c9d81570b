//! Every input that ever crashed a fuzz target (`fuzz/regressions/<target>/`), and the seeds
//! the targets start from (`fuzz/corpus/<target>/`), run through the same entry points the
//! fuzzers call, on the stable toolchain. A crash found by fuzzing stays fixed here, and the
//! entry points cannot rot between fuzzing runs.

use std::path::{Path, PathBuf};

/// The files under `fuzz/<kind>/<target>/`, sorted (none if the folder does not exist).
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("list a fuzz input folder").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Feeds every seed and regression input of `target` to `run`, naming the file that fails.
fn replay(target: &str, run: fn(&[u8])) {
    let seeds = inputs("corpus", target);
    assert!(!seeds.is_empty(), "fuzz/corpus/{target} has no seeds");
    for path in seeds.iter().chain(&inputs("regressions", target)) {
        let bytes = std::fs::read(path).expect("read a fuzz input");
        let outcome = std::panic::catch_unwind(|| run(&bytes));
        assert!(outcome.is_ok(), "{target} panicked on {}", path.display());
    }
}

macro_rules! replays {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target), tessera::fuzzing::$target);
            }
        )*
    };
}

replays!(
    first_block,
    authority_filter,
    spiffe_id,
    selector,
    agent_config,
    server_config,
    node_csr,
    event_batch,
    spool_recovery,
    crl,
);
