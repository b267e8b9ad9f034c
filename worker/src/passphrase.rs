//! Where the Pulumi passphrase comes from, and the rule that one is required
//! outside `--dev`.
//!
//! The passphrase encrypts every stack's secrets (Pulumi's passphrase
//! secrets provider). Sources, first one set wins: `--pulumi-passphrase`
//! (`CM_PULUMI_PASSPHRASE`), `--pulumi-passphrase-file`
//! (`CM_PULUMI_PASSPHRASE_FILE`), Pulumi's own `PULUMI_CONFIG_PASSPHRASE`,
//! then `PULUMI_CONFIG_PASSPHRASE_FILE`; under `--dev` only, a fixed public
//! one. An empty value counts as none. Kept out of `main.rs` so that the rule
//! is tested directly, not by spawning the binary.

use std::path::PathBuf;

use cm_core::{
    Secret,
    config::{ConfigError, read_secret},
};

/// Passphrase used by `--dev` when none is configured. Development only.
pub const DEV_PASSPHRASE: &str = "cm-dev-passphrase-not-for-production";

/// Every place a passphrase may be given.
#[derive(Debug, Default, Clone)]
pub struct PassphraseSources {
    /// `--pulumi-passphrase` / `CM_PULUMI_PASSPHRASE`.
    pub inline: Option<Secret<String>>,
    /// `--pulumi-passphrase-file` / `CM_PULUMI_PASSPHRASE_FILE`.
    pub file: Option<PathBuf>,
    /// Pulumi's `PULUMI_CONFIG_PASSPHRASE`.
    pub pulumi_env: Option<Secret<String>>,
    /// Pulumi's `PULUMI_CONFIG_PASSPHRASE_FILE`.
    pub pulumi_env_file: Option<PathBuf>,
    /// `--dev`: fall back to [`DEV_PASSPHRASE`].
    pub dev: bool,
}

/// Why no passphrase could be had.
#[derive(Debug, thiserror::Error)]
pub enum PassphraseError {
    #[error("give --pulumi-passphrase or --pulumi-passphrase-file, not both")]
    Both,
    #[error(transparent)]
    File(#[from] ConfigError),
    #[error(
        "no Pulumi passphrase configured: set CM_PULUMI_PASSPHRASE or PULUMI_CONFIG_PASSPHRASE, \
         or give --pulumi-passphrase-file (CM_PULUMI_PASSPHRASE_FILE, PULUMI_CONFIG_PASSPHRASE_FILE); \
         it encrypts every stack's secrets (`--dev` uses a public development passphrase)"
    )]
    Missing,
}

impl PassphraseSources {
    /// The flags given, with Pulumi's two variables read from this process's
    /// environment.
    pub fn with_pulumi_env(
        inline: Option<Secret<String>>,
        file: Option<PathBuf>,
        dev: bool,
    ) -> Self {
        Self {
            inline,
            file,
            pulumi_env: std::env::var("PULUMI_CONFIG_PASSPHRASE")
                .ok()
                .map(Secret::new),
            pulumi_env_file: std::env::var_os("PULUMI_CONFIG_PASSPHRASE_FILE").map(PathBuf::from),
            dev,
        }
    }

    /// The passphrase to use, by the rule in this module's header.
    pub fn resolve(self) -> Result<Secret<String>, PassphraseError> {
        let set = |s: Option<Secret<String>>| s.filter(|p| !p.expose().is_empty());
        let set_path = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        let inline = set(self.inline);
        let file = set_path(self.file);
        if inline.is_some() && file.is_some() {
            return Err(PassphraseError::Both);
        }
        if let Some(p) = inline {
            return Ok(p);
        }
        if let Some(path) = file {
            return Ok(read_secret("--pulumi-passphrase-file", &path)?);
        }
        if let Some(p) = set(self.pulumi_env) {
            return Ok(p);
        }
        if let Some(path) = set_path(self.pulumi_env_file) {
            return Ok(read_secret("PULUMI_CONFIG_PASSPHRASE_FILE", &path)?);
        }
        if self.dev {
            tracing::warn!(
                "--dev: Pulumi secrets are encrypted with the public development passphrase"
            );
            return Ok(Secret::new(DEV_PASSPHRASE.to_owned()));
        }
        Err(PassphraseError::Missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Option<Secret<String>> {
        Some(Secret::new(s.to_owned()))
    }

    fn file_with(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    #[test]
    fn none_configured_is_refused_outside_dev() {
        let err = PassphraseSources::default().resolve().expect_err("refused");
        assert!(matches!(err, PassphraseError::Missing));
        let empty = PassphraseSources {
            inline: secret(""),
            pulumi_env: secret(""),
            pulumi_env_file: Some(PathBuf::new()),
            ..Default::default()
        };
        assert!(matches!(empty.resolve(), Err(PassphraseError::Missing)));
    }

    #[test]
    fn dev_falls_back_to_the_public_passphrase_last() {
        let dev = PassphraseSources {
            dev: true,
            ..Default::default()
        };
        assert_eq!(dev.resolve().expect("dev").expose(), DEV_PASSPHRASE);
        let configured = PassphraseSources {
            pulumi_env: secret("from-env"),
            dev: true,
            ..Default::default()
        };
        assert_eq!(configured.resolve().expect("env").expose(), "from-env");
    }

    #[test]
    fn sources_in_order() {
        let pulumi_file = file_with("from-pulumi-file\n");
        let our_file = file_with("from-our-file\nsecond line ignored\n");
        let all = PassphraseSources {
            inline: secret("from-flag"),
            file: None,
            pulumi_env: secret("from-env"),
            pulumi_env_file: Some(pulumi_file.path().to_owned()),
            dev: true,
        };
        assert_eq!(all.clone().resolve().expect("flag").expose(), "from-flag");
        let file_first = PassphraseSources {
            inline: None,
            file: Some(our_file.path().to_owned()),
            ..all.clone()
        };
        assert_eq!(
            file_first.resolve().expect("file").expose(),
            "from-our-file"
        );
        let env = PassphraseSources {
            inline: None,
            ..all.clone()
        };
        assert_eq!(env.resolve().expect("env").expose(), "from-env");
        let env_file = PassphraseSources {
            inline: None,
            pulumi_env: None,
            ..all
        };
        assert_eq!(
            env_file.resolve().expect("env file").expose(),
            "from-pulumi-file"
        );
    }

    #[test]
    fn flag_and_file_together_are_refused() {
        let f = file_with("x");
        let both = PassphraseSources {
            inline: secret("a"),
            file: Some(f.path().to_owned()),
            ..Default::default()
        };
        assert!(matches!(both.resolve(), Err(PassphraseError::Both)));
    }

    #[test]
    fn an_empty_or_missing_file_is_an_error_naming_it() {
        let empty = file_with("\n");
        let err = PassphraseSources {
            file: Some(empty.path().to_owned()),
            ..Default::default()
        }
        .resolve()
        .expect_err("empty file");
        assert!(
            err.to_string().contains("--pulumi-passphrase-file"),
            "{err}"
        );
        let err = PassphraseSources {
            pulumi_env_file: Some("/nonexistent/passphrase".into()),
            dev: true,
            ..Default::default()
        }
        .resolve()
        .expect_err("missing file");
        assert!(
            err.to_string().contains("PULUMI_CONFIG_PASSPHRASE_FILE"),
            "{err}"
        );
    }
}
