//! Writing the files of the CA directory and of a node's state directory.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` with `mode` through a temporary file in the same
/// directory and a rename, so a reader never sees half a file and an existing file with
/// a wider mode is replaced, not reused. On failure, returns the path that failed with
/// its error.
pub(crate) fn write_atomically(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), (PathBuf, io::Error)> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.new"));
    let _ = fs::remove_file(&temporary);
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |error| (path, error)
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(failed(&temporary))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(failed(&temporary))?;
    fs::rename(&temporary, path).map_err(failed(path))
}
