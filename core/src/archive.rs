//! Scenario files on their way in: the path rules every file of a scenario
//! obeys wherever it comes from (an OCI layer's title, a tar entry), size
//! bounds, and tar(.gz) archives (reading them safely, writing them).
//!
//! A scenario path is relative, `/`-separated UTF-8, without `..`, without
//! a root or a drive, and without control characters: once joined to the
//! scenario directory it cannot leave it. Archives may hold regular files and
//! directories only; links of any kind (symbolic or hard) are refused, so
//! nothing extracted can point outside the directory either.

use std::{
    io::{Read, Write},
    path::{Component, Path, PathBuf},
};

/// Names of the Pulumi project file a scenario must hold at its root.
pub const PROJECT_FILES: [&str; 2] = ["Pulumi.yaml", "Pulumi.yml"];

/// Size bounds on what a scenario may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest single file (or OCI layer), in bytes.
    pub max_file: u64,
    /// Largest scenario, all files together, in bytes.
    pub max_total: u64,
    /// Most files in one scenario.
    pub max_files: usize,
}

impl Default for Limits {
    /// 256 MiB per file (a prebuilt Pulumi Go program is 40-80 MB), 512 MiB
    /// in all, 10 000 files.
    fn default() -> Self {
        Self {
            max_file: 256 << 20,
            max_total: 512 << 20,
            max_files: 10_000,
        }
    }
}

/// Why a scenario's files are refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A path that would leave the scenario directory, or is malformed.
    #[error("path {path:?} is refused: {reason}")]
    UnsafePath { path: String, reason: &'static str },
    /// An entry that is neither a regular file nor a directory.
    #[error("{path:?} is a {kind}; scenarios hold regular files and directories only")]
    NotAFile { path: String, kind: &'static str },
    /// The same path twice.
    #[error("{path:?} appears twice")]
    Duplicate { path: String },
    /// Over a size bound.
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// Over the file-count bound.
    #[error("more than {limit} files")]
    TooManyFiles { limit: usize },
    /// No `Pulumi.yaml` at the root.
    #[error("no Pulumi.yaml at the root of the scenario")]
    MissingProject,
    /// The archive does not parse.
    #[error("not a valid tar or tar.gz archive: {0}")]
    Malformed(String),
    /// Writing or reading the files failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ArchiveError {
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }

    fn unsafe_path(path: &str, reason: &'static str) -> Self {
        Self::UnsafePath {
            path: path.to_owned(),
            reason,
        }
    }
}

/// Checks a scenario path and returns it normalised (`./a//b` -> `a/b`).
pub fn safe_relative(path: &str) -> Result<String, ArchiveError> {
    if path.is_empty() {
        return Err(ArchiveError::unsafe_path(path, "it is empty"));
    }
    if path.len() > 4096 {
        return Err(ArchiveError::unsafe_path(
            path,
            "it is longer than 4096 bytes",
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(ArchiveError::unsafe_path(
            path,
            "it holds control characters",
        ));
    }
    if path.contains('\\') {
        return Err(ArchiveError::unsafe_path(path, "it holds a backslash"));
    }
    if path.starts_with('/') {
        return Err(ArchiveError::unsafe_path(path, "it is absolute"));
    }
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => match p.to_str() {
                Some(p) => parts.push(p),
                None => return Err(ArchiveError::unsafe_path(path, "it is not UTF-8")),
            },
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(ArchiveError::unsafe_path(path, "it holds '..'"));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(ArchiveError::unsafe_path(path, "it is absolute"));
            }
        }
    }
    if parts.is_empty() {
        return Err(ArchiveError::unsafe_path(path, "it names no file"));
    }
    Ok(parts.join("/"))
}

/// Whether `files` (normalised paths) hold a project file at the root.
pub fn has_project(files: &[String]) -> bool {
    files.iter().any(|f| PROJECT_FILES.contains(&f.as_str()))
}

/// A running count of what a scenario holds, against its limits.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    total: u64,
    files: usize,
}

impl Budget {
    /// A fresh budget.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            total: 0,
            files: 0,
        }
    }

    /// Accounts for one file of `size` bytes named `what`.
    pub fn add(&mut self, what: &str, size: u64) -> Result<(), ArchiveError> {
        if size > self.limits.max_file {
            return Err(ArchiveError::TooLarge {
                what: what.to_owned(),
                limit: self.limits.max_file,
            });
        }
        self.total = self.total.saturating_add(size);
        if self.total > self.limits.max_total {
            return Err(ArchiveError::TooLarge {
                what: "the scenario".into(),
                limit: self.limits.max_total,
            });
        }
        self.files += 1;
        if self.files > self.limits.max_files {
            return Err(ArchiveError::TooManyFiles {
                limit: self.limits.max_files,
            });
        }
        Ok(())
    }

    /// The limits counted against.
    pub fn limits(&self) -> Limits {
        self.limits
    }
}

/// Reads a tar or gzip-compressed tar (told apart by its magic bytes) and
/// applies the scenario rules to every entry.
///
/// Entries must lie under `prefix` when one is given (oras's directory
/// layers name their entries `<title>/...`). With `dest`, files are written
/// under it (it should be a fresh directory); without, the archive is only
/// checked. Returns the normalised paths of the regular files, sorted.
pub fn unpack(
    reader: impl Read,
    prefix: Option<&str>,
    dest: Option<&Path>,
    budget: &mut Budget,
) -> Result<Vec<String>, ArchiveError> {
    let mut reader = std::io::BufReader::new(reader);
    let gzip = {
        use std::io::BufRead;
        let head = reader
            .fill_buf()
            .map_err(|e| ArchiveError::Malformed(e.to_string()))?;
        head.starts_with(&[0x1f, 0x8b])
    };
    if gzip {
        unpack_tar(flate2::read::GzDecoder::new(reader), prefix, dest, budget)
    } else {
        unpack_tar(reader, prefix, dest, budget)
    }
}

fn unpack_tar(
    reader: impl Read,
    prefix: Option<&str>,
    dest: Option<&Path>,
    budget: &mut Budget,
) -> Result<Vec<String>, ArchiveError> {
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| ArchiveError::Malformed(e.to_string()))?;
    let mut files = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| ArchiveError::Malformed(e.to_string()))?;
        let raw = entry.path_bytes();
        let name = std::str::from_utf8(&raw)
            .map_err(|_| ArchiveError::unsafe_path(&String::from_utf8_lossy(&raw), "not UTF-8"))?
            .to_owned();
        let kind = entry.header().entry_type();
        let relative = match prefix {
            None => match safe_relative(&name) {
                Ok(p) => Some(p),
                // The archive's own root (`./`) is no file.
                Err(_)
                    if kind.is_dir()
                        && name.trim_start_matches("./").trim_matches('/').is_empty() =>
                {
                    None
                }
                Err(e) => return Err(e),
            },
            Some(prefix) => {
                let path = safe_relative(&name)?;
                if path == prefix {
                    None
                } else if path.starts_with(prefix) && path[prefix.len()..].starts_with('/') {
                    Some(path)
                } else {
                    return Err(ArchiveError::unsafe_path(
                        &name,
                        "it lies outside the layer's directory",
                    ));
                }
            }
        };
        let kind_name = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => None,
            tar::EntryType::Directory => {
                if let (Some(dest), Some(rel)) = (dest, &relative) {
                    let dir = dest.join(rel);
                    std::fs::create_dir_all(&dir).map_err(ArchiveError::io("creating", &dir))?;
                }
                continue;
            }
            tar::EntryType::Symlink => Some("symbolic link"),
            tar::EntryType::Link => Some("hard link"),
            tar::EntryType::Char | tar::EntryType::Block => Some("device"),
            tar::EntryType::Fifo => Some("fifo"),
            // pax and GNU extension headers are read by the tar crate itself.
            _ => Some("special entry"),
        };
        if let Some(kind) = kind_name {
            return Err(ArchiveError::NotAFile { path: name, kind });
        }
        let Some(relative) = relative else {
            return Err(ArchiveError::NotAFile {
                path: name,
                kind: "file named like its directory",
            });
        };
        if !seen.insert(relative.clone()) {
            return Err(ArchiveError::Duplicate { path: relative });
        }
        let size = entry.size();
        budget.add(&relative, size)?;
        let executable = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
        match dest {
            Some(dest) => {
                let path = dest.join(&relative);
                write_file(&path, &mut entry, size, executable)?;
            }
            None => {
                let copied = std::io::copy(&mut (&mut entry).take(size + 1), &mut std::io::sink())
                    .map_err(|e| ArchiveError::Malformed(e.to_string()))?;
                if copied != size {
                    return Err(ArchiveError::Malformed(format!(
                        "{relative}: {copied} bytes where the header says {size}"
                    )));
                }
            }
        }
        files.push(relative);
    }
    files.sort();
    Ok(files)
}

/// Writes `size` bytes from `from` to a new file at `path` (its parents
/// created), refusing to overwrite anything.
fn write_file(
    path: &Path,
    from: &mut impl Read,
    size: u64,
    executable: bool,
) -> Result<(), ArchiveError> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(ArchiveError::io("creating", parent))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if executable { 0o755 } else { 0o644 })
        .open(path)
        .map_err(ArchiveError::io("creating", path))?;
    let copied = std::io::copy(&mut from.take(size + 1), &mut file)
        .map_err(ArchiveError::io("writing", path))?;
    if copied != size {
        return Err(ArchiveError::Malformed(format!(
            "{}: {copied} bytes where the header says {size}",
            path.display()
        )));
    }
    file.flush().map_err(ArchiveError::io("writing", path))
}

/// The regular files under `dir` as (normalised relative path, absolute
/// path), sorted; `.git` is left out and links are refused.
pub fn list_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, ArchiveError> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), ArchiveError> {
        for entry in std::fs::read_dir(dir).map_err(ArchiveError::io("listing", dir))? {
            let entry = entry.map_err(ArchiveError::io("listing", dir))?;
            let path = entry.path();
            if entry.file_name() == ".git" {
                continue;
            }
            let kind = entry
                .file_type()
                .map_err(ArchiveError::io("inspecting", &path))?;
            let rel = path
                .strip_prefix(root)
                .ok()
                .and_then(Path::to_str)
                .ok_or_else(|| ArchiveError::unsafe_path(&path.display().to_string(), "not UTF-8"))?
                .to_owned();
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                out.push((safe_relative(&rel)?, path));
            } else {
                return Err(ArchiveError::NotAFile {
                    path: rel,
                    kind: if kind.is_symlink() {
                        "symbolic link"
                    } else {
                        "special file"
                    },
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// A gzip-compressed tar of the regular files under `dir` (paths relative to
/// it, modes kept, owners and times zeroed so equal trees give equal bytes).
pub fn pack_dir(dir: &Path) -> Result<Vec<u8>, ArchiveError> {
    use std::os::unix::fs::PermissionsExt;
    let files = list_files(dir)?;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(gz);
    for (rel, path) in files {
        let data = std::fs::read(&path).map_err(ArchiveError::io("reading", &path))?;
        let mode = std::fs::metadata(&path)
            .map_err(ArchiveError::io("inspecting", &path))?
            .permissions()
            .mode();
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(if mode & 0o111 != 0 { 0o755 } else { 0o644 });
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(0);
        builder
            .append_data(&mut header, &rel, data.as_slice())
            .map_err(ArchiveError::io("archiving", &path))?;
    }
    let gz = builder
        .into_inner()
        .map_err(ArchiveError::io("archiving", dir))?;
    gz.finish().map_err(ArchiveError::io("compressing", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_escape_are_refused() {
        assert_eq!(safe_relative("./a//b").expect("fine"), "a/b");
        assert_eq!(safe_relative("Pulumi.yaml").expect("fine"), "Pulumi.yaml");
        for (bad, why) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../x", "'..'"),
            ("a/../../x", "'..'"),
            ("a\\..\\x", "backslash"),
            (".", "names no file"),
            ("a\nb", "control"),
        ] {
            let err = safe_relative(bad).expect_err(bad);
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
    }

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            // Written raw: the tar crate's own setters refuse `..`.
            let bytes = name.as_bytes();
            header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            if let Some(link) = link {
                let l = link.as_bytes();
                header.as_old_mut().linkname[..l.len()].copy_from_slice(l);
            }
            header.set_cksum();
            builder.append(&header, *data).expect("append");
        }
        builder.into_inner().expect("tar")
    }

    #[test]
    fn archives_unpack_and_check_without_writing() {
        let tar = tar_with(&[
            ("./", tar::EntryType::Directory, b"", None),
            ("./Pulumi.yaml", tar::EntryType::Regular, b"name: x\n", None),
            ("sub/", tar::EntryType::Directory, b"", None),
            (
                "sub/main.go",
                tar::EntryType::Regular,
                b"package main\n",
                None,
            ),
        ]);
        let mut budget = Budget::new(Limits::default());
        let files = unpack(tar.as_slice(), None, None, &mut budget).expect("checks");
        assert_eq!(files, ["Pulumi.yaml", "sub/main.go"]);
        assert!(has_project(&files));

        let dir = tempfile::tempdir().expect("tempdir");
        let gz = {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(&tar).expect("gzip");
            enc.finish().expect("gzip")
        };
        let mut budget = Budget::new(Limits::default());
        unpack(gz.as_slice(), None, Some(dir.path()), &mut budget).expect("unpacks");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("sub/main.go")).expect("read"),
            "package main\n"
        );
    }

    #[test]
    fn archives_that_escape_or_link_are_refused() {
        for (entries, why) in [
            (
                vec![("../evil", tar::EntryType::Regular, &b"x"[..], None)],
                "'..'",
            ),
            (
                vec![("/etc/cron.d/x", tar::EntryType::Regular, &b"x"[..], None)],
                "absolute",
            ),
            (
                vec![(
                    "link",
                    tar::EntryType::Symlink,
                    &b""[..],
                    Some("/etc/passwd"),
                )],
                "symbolic link",
            ),
            (
                vec![("hard", tar::EntryType::Link, &b""[..], Some("../x"))],
                "hard link",
            ),
            (
                vec![
                    ("a", tar::EntryType::Regular, &b"1"[..], None),
                    ("./a", tar::EntryType::Regular, &b"2"[..], None),
                ],
                "twice",
            ),
        ] {
            let tar = tar_with(&entries);
            let dir = tempfile::tempdir().expect("tempdir");
            let mut budget = Budget::new(Limits::default());
            let err = unpack(tar.as_slice(), None, Some(dir.path()), &mut budget).expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
            assert!(!dir.path().parent().expect("parent").join("evil").exists());
        }
    }

    #[test]
    fn prefixed_layers_stay_in_their_directory() {
        let ok = tar_with(&[
            ("web/", tar::EntryType::Directory, b"", None),
            ("web/index.html", tar::EntryType::Regular, b"hi", None),
        ]);
        let mut budget = Budget::new(Limits::default());
        let files = unpack(ok.as_slice(), Some("web"), None, &mut budget).expect("fine");
        assert_eq!(files, ["web/index.html"]);
        let bad = tar_with(&[("other/x", tar::EntryType::Regular, b"x", None)]);
        let mut budget = Budget::new(Limits::default());
        let err = unpack(bad.as_slice(), Some("web"), None, &mut budget).expect_err("outside");
        assert!(err.to_string().contains("outside"), "{err}");
    }

    #[test]
    fn limits_are_enforced() {
        let tar = tar_with(&[
            ("a", tar::EntryType::Regular, &[0u8; 100], None),
            ("b", tar::EntryType::Regular, &[0u8; 100], None),
        ]);
        let limits = Limits {
            max_file: 50,
            ..Limits::default()
        };
        let err = unpack(tar.as_slice(), None, None, &mut Budget::new(limits)).expect_err("file");
        assert!(err.to_string().contains("a is larger"), "{err}");
        let limits = Limits {
            max_total: 150,
            ..Limits::default()
        };
        let err = unpack(tar.as_slice(), None, None, &mut Budget::new(limits)).expect_err("total");
        assert!(err.to_string().contains("the scenario is larger"), "{err}");
    }

    #[test]
    fn packed_directories_unpack_to_the_same_files() {
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("sub")).expect("mkdir");
        std::fs::write(src.path().join("Pulumi.yaml"), "name: x\n").expect("write");
        std::fs::write(src.path().join("sub/f"), "f").expect("write");
        let packed = pack_dir(src.path()).expect("pack");
        assert_eq!(packed, pack_dir(src.path()).expect("pack again"));
        let dest = tempfile::tempdir().expect("tempdir");
        let files = unpack(
            packed.as_slice(),
            None,
            Some(dest.path()),
            &mut Budget::new(Limits::default()),
        )
        .expect("unpack");
        assert_eq!(files, ["Pulumi.yaml", "sub/f"]);
        assert_eq!(
            std::fs::read(dest.path().join("sub/f")).expect("read"),
            b"f"
        );
    }
}
