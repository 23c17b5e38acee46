//! Atomic file replacement: readers see the old file or the new one, never a part of either.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` so that a reader, or a crash at any moment, sees either the previous
/// file or the complete new one:
///
/// 1. a new temporary file `.NAME.PID.N.tmp` is created in `path`'s directory (the same file
///    system, so the rename below is atomic);
/// 2. the bytes are written and the file is flushed to disk (`fsync`);
/// 3. it is renamed over `path`;
/// 4. the directory is flushed too, making the rename itself durable (on Unix; other platforms
///    cannot open a directory for that).
///
/// On any failure the temporary file is removed and the error names `path`; an existing file at
/// `path` is then left as it was.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("metrics.csv");
/// model::write_atomic(&path, b"epoch,loss\n")?;
/// assert_eq!(std::fs::read(&path)?, b"epoch,loss\n");
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "cannot write {}: directory {} does not exist",
                path.display(),
                dir.display()
            ),
        ));
    }
    write_via(path, dir, &temp_path(dir, path), bytes)
}

/// [`write_atomic`] through the temporary file `tmp` in `dir`.
fn write_via(path: &Path, dir: &Path, tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("writing {}: {e}", path.display()));
    // `create_new`: never write through a file (or link) that is already there, and never remove
    // one this call did not create.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(named)?;
    let written = write_synced(file, bytes).and_then(|()| std::fs::rename(tmp, path));
    if let Err(e) = written {
        // Every failure after the creation (a short write, a full disk, a rename onto a
        // directory) removes the temporary file.
        let _ = std::fs::remove_file(tmp);
        return Err(named(e));
    }
    sync_dir(dir).map_err(named)
}

/// A name in `dir` that no other writer uses: the target's name, the process id and a counter
/// (two threads of one process may write the same target).
fn temp_path(dir: &Path, path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

fn write_synced(mut f: std::fs::File, bytes: &[u8]) -> io::Result<()> {
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    match std::fs::File::open(dir)?.sync_all() {
        // Some file systems cannot sync a directory and say so; the rename is done regardless.
        Err(e) if matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported) => Ok(()),
        r => r,
    }
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_name_taken_by_another_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t.bin");
        let taken = dir.path().join(".t.bin.taken.tmp");
        std::fs::write(&taken, b"theirs").unwrap();
        let e = write_via(&target, dir.path(), &taken, b"mine").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&taken).unwrap(), b"theirs");
        assert!(!target.exists());
    }
}
