//! Object storage for inputs and outputs through `object_store`: `file:///…` (default) or
//! `gs://bucket/prefix` in production.
//!
//! Layout under the output root, all names deterministic:
//! - `{job}/chunks/shard-{s:05}/{start:010}-e{epoch}.jsonl`: one committed chunk, lines
//!   `start..start+n` of the shard. The epoch in the name keeps a worker that lost its lease
//!   from overwriting the chunk of the worker that took over.
//! - `{job}/output/shard-{s:05}.jsonl`: a batch shard's committed chunks concatenated,
//!   written once the shard is marked done with its last chunk listed (whoever writes it
//!   writes the same bytes). `output_uri` is `{root}/{job}/output/`: exactly one line per
//!   input item across its files. A chat job has none: its reply is in its job record.
//!
//! A write is durable when `put` returns, on `file://` too (object_store's local backend with
//! fsync of the file and its directory): a shard's message is acked only after its outputs are
//! durable, and a VM that loses power must not come back with a committed chunk missing.
//!
//! On `file://` object_store writes `{name}#{n}` and renames it into place; a writer killed in
//! between leaves that staged copy behind, and the next writer stages under the next free `n`.
//! Listing through object_store skips such files, but a user reading the output folder with
//! plain tools would see the copy beside the real file, with the same lines. So a `file://`
//! put first removes what killed writers of the same name left; on `gs://` an upload is
//! all-or-nothing and leaves nothing.

use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

/// Why storage failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0}")]
    Config(String),
    #[error("object storage: {0}")]
    Store(#[from] object_store::Error),
    /// The input object is not the version the job was planned from.
    #[error("{0} changed after the job was planned (another version of the object)")]
    Changed(String),
}

/// A store plus the prefix everything goes under.
#[derive(Debug, Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    /// The same store, on `file://`: where a name's staged copies would be.
    local: Option<Arc<LocalFileSystem>>,
    prefix: ObjectPath,
    /// The root as the user wrote it, without a trailing `/`.
    uri: String,
}

/// Checks the form of an output root, changing nothing: `file:///absolute/dir` (not an
/// existing file) or `gs://bucket[/prefix]`. The error says what is wrong and what to write
/// instead.
pub fn check_root(uri: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(uri).map_err(|e| {
        format!("{uri:?} is not a URL ({e}); use file:///absolute/dir or gs://bucket/prefix")
    })?;
    match url.scheme() {
        "file" => {
            let dir = url
                .to_file_path()
                .map_err(|()| format!("{uri:?}: use an absolute path, file:///dir"))?;
            if dir.exists() && !dir.is_dir() {
                return Err(format!(
                    "{uri:?}: {} is a file; name a folder (it is created if missing)",
                    dir.display()
                ));
            }
        }
        "gs" => {
            if url.host_str().is_none_or(str::is_empty) {
                return Err(format!("{uri:?} names no bucket; use gs://bucket/prefix"));
            }
        }
        other => {
            return Err(format!(
                "{uri:?}: scheme {other:?} is not supported; use file:// or gs://"
            ));
        }
    }
    Ok(url)
}

/// Opens `file:///abs/dir` (created if missing) or `gs://bucket[/prefix]`.
pub fn open(uri: &str) -> Result<Location, OutputError> {
    let url = check_root(uri).map_err(OutputError::Config)?;
    if let Ok(dir) = url.to_file_path() {
        std::fs::create_dir_all(&dir)
            .map_err(|e| OutputError::Config(format!("cannot create {}: {e}", dir.display())))?;
    }
    let (store, local, prefix): (Arc<dyn ObjectStore>, _, _) = if url.scheme() == "file" {
        let (_, prefix) = object_store::ObjectStoreScheme::parse(&url)
            .map_err(|e| OutputError::Config(format!("{uri:?}: {e}")))?;
        let local = Arc::new(LocalFileSystem::new().with_fsync(true));
        (local.clone(), Some(local), prefix)
    } else {
        let (store, prefix) = gs_store(&url)?;
        (Arc::from(store), None, prefix)
    };
    Ok(Location {
        store,
        local,
        prefix,
        uri: uri.trim_end_matches('/').to_owned(),
    })
}

impl Location {
    fn path(&self, rel: &str) -> ObjectPath {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }

    /// `{root}/{rel}` as a URI.
    pub fn uri(&self, rel: &str) -> String {
        format!("{}/{rel}", self.uri)
    }

    /// Writes `data` at `rel` (atomically: readers see the old object or the new one). On
    /// `file://`, staged copies of `rel` that killed writers left are removed first.
    pub async fn put(&self, rel: &str, data: Vec<u8>) -> Result<(), OutputError> {
        let path = self.path(rel);
        if let Some(local) = &self.local {
            remove_staged_copies(&local.path_to_filesystem(&path)?);
        }
        self.store.put(&path, Bytes::from(data).into()).await?;
        Ok(())
    }

    pub async fn get(&self, rel: &str) -> Result<Vec<u8>, OutputError> {
        let r = self.store.get(&self.path(rel)).await?;
        Ok(r.bytes().await?.to_vec())
    }
}

/// Removes `{file}#1`, `{file}#2`, …: object_store's staged uploads of `file`, which only a
/// writer killed between writing and renaming leaves (see the module's docs). The numbers are
/// taken in order from 1, so the search stops after a few absent ones. A writer staging the
/// same name at this moment (a worker that has lost the shard's lease) loses its copy and its
/// put fails.
fn remove_staged_copies(file: &std::path::Path) {
    const GAP: u32 = 4;
    let (mut n, mut absent) = (1u32, 0u32);
    while absent < GAP && n < 1024 {
        let mut staged = file.as_os_str().to_owned();
        staged.push(format!("#{n}"));
        let staged = std::path::PathBuf::from(staged);
        match std::fs::remove_file(&staged) {
            Ok(()) => {
                absent = 0;
                tracing::info!(path = %staged.display(), "removed a staged copy a killed writer left");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => absent += 1,
            Err(e) => {
                tracing::warn!(path = %staged.display(), error = %e, "cannot remove a staged copy a killed writer left");
                absent += 1;
            }
        }
        n += 1;
    }
}

/// The `GOOGLE_*` variables of `vars`: the settings of the `gs://` store (`GOOGLE_SERVICE_ACCOUNT`,
/// `GOOGLE_APPLICATION_CREDENTIALS`, …; none: the VM's service account). `object_store` also
/// reads unprefixed names (`BUCKET`, `TIMEOUT`, `BASE_URL`, `PROXY_URL`, …), far too common in
/// an environment to let them redirect or slow the outputs unasked.
fn google_options(
    vars: impl Iterator<Item = (String, String)>,
) -> impl Iterator<Item = (String, String)> {
    vars.filter(|(k, _)| k.starts_with("GOOGLE_"))
}

/// The store of a `gs://` (or `file://`) URL, set up by the process's `GOOGLE_*` variables, and
/// the path in it.
fn gs_store(url: &url::Url) -> Result<(Box<dyn ObjectStore>, ObjectPath), object_store::Error> {
    object_store::parse_url_opts(url, google_options(std::env::vars()))
}

/// The store and path of an object given by its full URI (`gs://bucket/file.jsonl`,
/// `file:///…`).
fn object(uri: &str) -> Result<(Box<dyn ObjectStore>, ObjectPath), OutputError> {
    let url = url::Url::parse(uri)
        .map_err(|e| OutputError::Config(format!("{uri:?} is not a URL ({e})")))?;
    if !matches!(url.scheme(), "file" | "gs") {
        return Err(OutputError::Config(format!(
            "{uri:?}: scheme {:?} is not supported; use gs:// (or file:// for local runs)",
            url.scheme()
        )));
    }
    Ok(gs_store(&url)?)
}

/// Reads a whole object given by its full URI.
pub async fn read_uri(uri: &str) -> Result<Vec<u8>, OutputError> {
    let (store, path) = object(uri)?;
    let r = store.get(&path).await?;
    Ok(r.bytes().await?.to_vec())
}

/// Reads the object at `uri` piece by piece as storage delivers it, never whole: `start`
/// makes the reader from the object's version (ETag, where the store has one), `feed` gives
/// it each piece in order and says whether to go on. `None`: `feed` stopped the read.
pub async fn read_uri_pieces<T>(
    uri: &str,
    start: impl FnOnce(Option<&str>) -> T,
    mut feed: impl FnMut(&mut T, &[u8]) -> bool,
) -> Result<Option<T>, OutputError> {
    use futures::StreamExt;
    let (store, path) = object(uri)?;
    let r = store.get(&path).await?;
    let mut reader = start(r.meta.e_tag.as_deref());
    let mut pieces = r.into_stream();
    while let Some(piece) = pieces.next().await {
        if !feed(&mut reader, &piece?) {
            return Ok(None);
        }
    }
    Ok(Some(reader))
}

/// Reads bytes `range` of the object at `uri`. With `version`, the object must still have
/// that ETag ([`OutputError::Changed`] if not).
pub async fn read_uri_range(
    uri: &str,
    range: std::ops::Range<u64>,
    version: Option<&str>,
) -> Result<Vec<u8>, OutputError> {
    let (store, path) = object(uri)?;
    let options = object_store::GetOptions {
        if_match: version.map(str::to_owned),
        // An empty range still checks the version (`head`), and asks for no bytes.
        head: range.is_empty(),
        range: (!range.is_empty()).then(|| range.clone().into()),
        ..Default::default()
    };
    let r = match store.get_opts(&path, options).await {
        Ok(r) => r,
        Err(object_store::Error::Precondition { .. }) => {
            return Err(OutputError::Changed(uri.to_owned()));
        }
        Err(e) => return Err(e.into()),
    };
    if range.is_empty() {
        return Ok(Vec::new());
    }
    let bytes = r.bytes().await?;
    if bytes.len() as u64 != range.end - range.start {
        return Err(OutputError::Changed(uri.to_owned()));
    }
    Ok(bytes.to_vec())
}

/// Object name of a committed chunk.
pub fn chunk_name(job: &str, shard: u32, start: u64, epoch: u64) -> String {
    format!("{job}/chunks/shard-{shard:05}/{start:010}-e{epoch}.jsonl")
}

/// Object name of a completed shard's output.
pub fn shard_output_name(job: &str, shard: u32) -> String {
    format!("{job}/output/shard-{shard:05}.jsonl")
}

/// The job's `output_uri`.
pub fn output_prefix(job: &str) -> String {
    format!("{job}/output/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_google_variables_configure_the_gs_store() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let url = url::Url::parse("gs://outputs/jobs").expect("url");
        // A `TIMEOUT` meant for something else, which `object_store` would read as its own.
        let unrelated = env(&[("TIMEOUT", "soon"), ("BUCKET", "elsewhere")]);
        assert!(object_store::parse_url_opts(&url, unrelated.clone()).is_err());
        let (store, path) =
            object_store::parse_url_opts(&url, google_options(unrelated.into_iter()))
                .expect("the unrelated variables are left out");
        assert_eq!(
            (store.to_string().as_str(), path.as_ref()),
            ("GoogleCloudStorage(outputs)", "jobs")
        );
        // The store's own settings still reach it.
        let own = env(&[("GOOGLE_TIMEOUT", "soon")]);
        assert!(object_store::parse_url_opts(&url, google_options(own.into_iter())).is_err());
    }

    #[test]
    fn roots_are_checked_before_anything_is_touched() {
        let tmp = std::env::temp_dir();
        let folder = url::Url::from_directory_path(&tmp).expect("absolute temp dir");
        let missing = tmp.join(format!("roots-missing-{}", std::process::id()));
        let missing = url::Url::from_file_path(&missing).expect("absolute path");
        for ok in [
            folder.as_str(),
            missing.as_str(),
            "gs://bucket",
            "gs://bucket/pre/fix",
        ] {
            assert!(check_root(ok).is_ok(), "{ok}");
        }
        let file = tmp.join(format!("roots-file-{}", std::process::id()));
        std::fs::write(&file, b"").expect("a file");
        let as_root = url::Url::from_file_path(&file).expect("absolute path");
        let e = check_root(as_root.as_str()).expect_err("a file is no root");
        let _ = std::fs::remove_file(&file);
        assert!(e.contains("is a file; name a folder"), "{e}");
        for (bad, says) in [
            ("gs://", "names no bucket"),
            ("s3://b/x", "scheme \"s3\" is not supported"),
            ("outputs", "is not a URL"),
            ("file://host/x", "use an absolute path"),
        ] {
            let e = check_root(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    /// A `file://` root whose path needs percent-encoding: the chunk lands under that directory
    /// with its deterministic name and reads back.
    #[tokio::test]
    async fn local_put_lands_under_the_root_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("outputs test {}%20ü", std::process::id()));
        let root = url::Url::from_directory_path(&dir).expect("absolute temp dir");
        let loc = open(root.as_str()).expect("open file:// root");
        let name = chunk_name("job-1", 3, 1024, 2);
        loc.put(&name, b"{\"i\":1}\n".to_vec())
            .await
            .expect("durable put");
        assert_eq!(
            std::fs::read(dir.join("job-1/chunks/shard-00003/0000001024-e2.jsonl"))
                .expect("the chunk is a file under the root"),
            b"{\"i\":1}\n"
        );
        assert_eq!(loc.get(&name).await.expect("get"), b"{\"i\":1}\n");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    /// A put over the staged copies killed writers left (`#1`, `#3`: numbers are taken from 1,
    /// with gaps where a writer finished) removes them, so the folder holds the object alone;
    /// other files are kept.
    #[tokio::test]
    async fn a_local_put_removes_staged_copies_that_killed_writers_left() {
        let dir = std::env::temp_dir().join(format!("outputs staged {}", std::process::id()));
        let root = url::Url::from_directory_path(&dir).expect("absolute temp dir");
        let loc = open(root.as_str()).expect("open file:// root");
        let name = shard_output_name("job-1", 0);
        let out = dir.join("job-1/output");
        std::fs::create_dir_all(&out).expect("output dir");
        for left in [
            "shard-00000.jsonl#1",
            "shard-00000.jsonl#3",
            "shard-00001.jsonl#1",
        ] {
            std::fs::write(out.join(left), "{\"i\":1}\n").expect("a staged copy");
        }
        std::fs::write(out.join("shard-00000.jsonl#x"), "not staged").expect("another file");
        loc.put(&name, b"{\"i\":2}\n".to_vec()).await.expect("put");
        let mut files: Vec<String> = std::fs::read_dir(&out)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "shard-00000.jsonl",
                "shard-00000.jsonl#x",
                "shard-00001.jsonl#1"
            ]
        );
        assert_eq!(loc.get(&name).await.expect("get"), b"{\"i\":2}\n");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    /// A shard reads its byte range of the version its job was planned from; once the object
    /// is replaced, the read fails as `Changed` instead of returning the other file's bytes.
    #[tokio::test]
    async fn a_range_read_refuses_another_version_of_the_input() {
        let dir = std::env::temp_dir().join(format!("outputs range {}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("in.jsonl");
        std::fs::write(&file, "line one\nline two\n").expect("write input");
        let uri = url::Url::from_file_path(&file)
            .expect("absolute path")
            .to_string();
        let (version, bytes) = read_uri_pieces(
            &uri,
            |v| (v.map(str::to_owned), Vec::new()),
            |(_, all), piece| {
                all.extend_from_slice(piece);
                true
            },
        )
        .await
        .expect("read in pieces")
        .expect("never stopped");
        assert_eq!(bytes, b"line one\nline two\n");
        let version = version.expect("local files have an ETag");
        let read = |r: std::ops::Range<u64>, v: Option<String>| {
            let uri = uri.clone();
            async move { read_uri_range(&uri, r, v.as_deref()).await }
        };
        assert_eq!(
            read(9..18, Some(version.clone())).await.expect("range"),
            b"line two\n"
        );
        assert_eq!(read(9..9, Some(version.clone())).await.expect("empty"), b"");
        assert_eq!(read(0..4, None).await.expect("unversioned"), b"line");
        let stopped = read_uri_pieces(&uri, |_| (), |_, _| false).await;
        assert!(
            matches!(stopped, Ok(None)),
            "a stopped read gives no reader"
        );

        std::fs::write(&file, "another file, longer than the first\n").expect("replace");
        for r in [9..18, 9..9] {
            let err = read(r.clone(), Some(version.clone()))
                .await
                .expect_err("changed");
            assert!(matches!(err, OutputError::Changed(_)), "{r:?}: {err}");
        }
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
