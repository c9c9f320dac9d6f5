//! Files in a Kubernetes Secret or ConfigMap volume, which the kubelet
//! updates by swapping a `..data` symlink.

use std::path::Path;

/// How many times a file that is not found is opened. An open resolving
/// `tls.crt -> ..data/tls.crt -> ..2026_..../tls.crt` while kubelet swaps
/// `..data` and deletes the old version's directory can find nothing,
/// though the file is there through the new `..data` a moment later.
pub const VANISHED_PATH_READ_ATTEMPTS: usize = 3;

/// Reads `path` with `read_file`, opening it again when it is not found,
/// [`VANISHED_PATH_READ_ATTEMPTS`] times at most.
pub fn read_across_swaps(
    path: &Path,
    mut read_file: impl FnMut(&Path) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Vec<u8>> {
    let mut result = read_file(path);
    for _ in 1..VANISHED_PATH_READ_ATTEMPTS {
        match &result {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => result = read_file(path),
            _ => break,
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_vanishes_for_a_moment_is_read_again() {
        let mut opens = 0;
        let read = read_across_swaps(Path::new("f"), |_| {
            opens += 1;
            if opens == 1 {
                Err(std::io::ErrorKind::NotFound.into())
            } else {
                Ok(b"content".to_vec())
            }
        });
        assert_eq!(read.unwrap(), b"content");
        assert_eq!(opens, 2);
    }

    #[test]
    fn a_missing_file_is_reported_after_a_few_opens() {
        let mut opens = 0;
        let read = read_across_swaps(Path::new("f"), |_| {
            opens += 1;
            Err(std::io::ErrorKind::NotFound.into())
        });
        assert_eq!(read.unwrap_err().kind(), std::io::ErrorKind::NotFound);
        assert_eq!(opens, VANISHED_PATH_READ_ATTEMPTS);
    }

    #[test]
    fn other_read_errors_are_reported_at_once() {
        let mut opens = 0;
        let read = read_across_swaps(Path::new("f"), |_| {
            opens += 1;
            Err(std::io::ErrorKind::PermissionDenied.into())
        });
        assert_eq!(
            read.unwrap_err().kind(),
            std::io::ErrorKind::PermissionDenied
        );
        assert_eq!(opens, 1);
    }
}
