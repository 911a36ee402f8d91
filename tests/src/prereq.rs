//! Finding the tools the local stack needs, with one clear line for each that is missing.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// A missing prerequisite: `Display` is the one line a user sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub String);

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Missing {}

/// Finds `program` on a `PATH`-style list of directories.
pub fn which(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The emulator launchers, found and checked.
#[derive(Debug, Clone)]
pub struct EmulatorTools {
    pub pubsub: PathBuf,
    pub firestore: PathBuf,
}

/// Where to look: the process environment, or explicit values in tests.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub path: Option<std::ffi::OsString>,
    /// `CLOUDSDK_ROOT_DIR`: the Google Cloud SDK root; else found from `gcloud` on `PATH`.
    pub sdk_root: Option<PathBuf>,
}

impl Env {
    pub fn from_process() -> Self {
        Self {
            path: std::env::var_os("PATH"),
            sdk_root: std::env::var_os("CLOUDSDK_ROOT_DIR").map(PathBuf::from),
        }
    }
}

/// Checks for `java` and both emulators; the error names the first missing piece and how to
/// install it.
pub fn emulator_tools(env: &Env) -> Result<EmulatorTools, Missing> {
    if which("java", env.path.as_deref()).is_none() {
        return Err(Missing(
            "java not found on PATH (the Google emulators need Java 17+): install it with `sudo apt-get install -y openjdk-17-jre-headless`".into(),
        ));
    }
    let root = match &env.sdk_root {
        Some(r) => r.clone(),
        None => {
            let gcloud = which("gcloud", env.path.as_deref()).ok_or_else(|| {
                Missing("gcloud not found on PATH and CLOUDSDK_ROOT_DIR unset: install the Google Cloud CLI with `sudo apt-get install -y google-cloud-cli` (or set CLOUDSDK_ROOT_DIR to its root)".into())
            })?;
            let real = gcloud.canonicalize().unwrap_or(gcloud);
            // <root>/bin/gcloud
            real.parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_default()
        }
    };
    let pubsub = root.join("platform/pubsub-emulator/bin/cloud-pubsub-emulator");
    if !is_executable(&pubsub) {
        return Err(Missing(format!(
            "Pub/Sub emulator not found at {}: install it with `gcloud components install pubsub-emulator` (or `sudo apt-get install -y google-cloud-cli-pubsub-emulator`)",
            pubsub.display()
        )));
    }
    let firestore = root.join("platform/cloud-firestore-emulator/cloud_firestore_emulator");
    if !is_executable(&firestore) {
        return Err(Missing(format!(
            "Firestore emulator not found at {}: install it with `gcloud components install cloud-firestore-emulator` (or `sudo apt-get install -y google-cloud-cli-firestore-emulator`)",
            firestore.display()
        )));
    }
    Ok(EmulatorTools { pubsub, firestore })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(crate::unique_name(name));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn exe(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn missing_java_names_the_install_command() {
        let empty = scratch("nojava");
        let err = emulator_tools(&Env {
            path: Some(empty.into_os_string()),
            sdk_root: None,
        })
        .expect_err("no java");
        assert!(err.0.starts_with("java not found"), "{err}");
        assert!(
            err.0.contains("apt-get install -y openjdk-17-jre-headless"),
            "{err}"
        );
        assert!(!err.0.contains('\n'));
    }

    #[test]
    fn missing_emulators_name_the_install_command() {
        let bin = scratch("java");
        exe(&bin.join("java"));
        let sdk = scratch("sdk");
        let env = Env {
            path: Some(bin.into_os_string()),
            sdk_root: Some(sdk.clone()),
        };
        let err = emulator_tools(&env).expect_err("no pubsub");
        assert!(
            err.0.contains("gcloud components install pubsub-emulator"),
            "{err}"
        );

        exe(&sdk.join("platform/pubsub-emulator/bin/cloud-pubsub-emulator"));
        let err = emulator_tools(&env).expect_err("no firestore");
        assert!(
            err.0
                .contains("gcloud components install cloud-firestore-emulator"),
            "{err}"
        );

        exe(&sdk.join("platform/cloud-firestore-emulator/cloud_firestore_emulator"));
        assert!(emulator_tools(&env).is_ok());
    }

    #[test]
    fn missing_gcloud_is_named() {
        let bin = scratch("java2");
        exe(&bin.join("java"));
        let err = emulator_tools(&Env {
            path: Some(bin.into_os_string()),
            sdk_root: None,
        })
        .expect_err("no gcloud");
        assert!(err.0.starts_with("gcloud not found"), "{err}");
    }
}
