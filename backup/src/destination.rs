//! Where backups live: a URL resolved to an object store and a prefix inside it.
//!
//! - `s3://bucket/prefix` — S3 or an S3-compatible store; credentials, region and endpoint from
//!   the usual environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//!   `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint);
//! - `gs://bucket/prefix` — Google Cloud Storage (`GOOGLE_SERVICE_ACCOUNT`, …);
//! - `az://container/prefix` — Azure Blob Storage (`AZURE_STORAGE_ACCOUNT_NAME`, …);
//! - `file:///abs/dir` or a plain path — a local directory (created when missing).

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error(
        "{url:?} is not a backup location: use s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///dir or a path"
    )]
    Unsupported { url: String },
    #[error("{url}: {source}")]
    Store { url: String, source: object_store::Error },
    #[error("{url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("{url}: {key:?} is not a setting of this kind of store (e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL)")]
    UnknownOption { url: String, key: String },
}

/// A store's setting from its environment-variable name (`AWS_ENDPOINT_URL` → the S3 endpoint).
fn config_key<K: std::str::FromStr>(url: &str, name: &str) -> Result<K, DestinationError> {
    name.to_ascii_lowercase()
        .parse()
        .map_err(|_| DestinationError::UnknownOption { url: url.to_owned(), key: name.to_owned() })
}

/// A backup's location.
#[derive(Clone)]
pub struct Destination {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Destination {
    /// Resolves `url` (credentials come from the environment, see the module docs).
    pub fn open(url: &str) -> Result<Destination, DestinationError> {
        Self::open_with(url, &[])
    }

    /// Resolves `url` with `options` on top of the environment: pairs named as the environment
    /// names them (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `GOOGLE_SERVICE_ACCOUNT`,
    /// `AZURE_STORAGE_ACCOUNT_KEY`, …), e.g. the keys of a Kubernetes Secret.
    pub fn open_with(url: &str, options: &[(String, String)]) -> Result<Destination, DestinationError> {
        let store_err = |source| DestinationError::Store { url: url.to_owned(), source };
        let (scheme, rest) = url.split_once("://").unwrap_or(("file", url));
        let (store, prefix): (Arc<dyn ObjectStore>, &str) = match scheme {
            "s3" | "s3a" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
                for (key, value) in options {
                    builder = builder.with_config(config_key(url, key)?, value);
                }
                let store = builder.build().map_err(store_err)?;
                (Arc::new(store), prefix)
            }
            "gs" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let mut builder = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
                for (key, value) in options {
                    builder = builder.with_config(config_key(url, key)?, value);
                }
                let store = builder.build().map_err(store_err)?;
                (Arc::new(store), prefix)
            }
            "az" | "azure" => {
                let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env().with_container_name(container);
                for (key, value) in options {
                    builder = builder.with_config(config_key(url, key)?, value);
                }
                let store = builder.build().map_err(store_err)?;
                (Arc::new(store), prefix)
            }
            "file" => {
                let dir = std::path::Path::new(rest);
                std::fs::create_dir_all(dir).map_err(|source| DestinationError::Io { url: url.to_owned(), source })?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(store_err)?;
                (Arc::new(store), "")
            }
            _ => return Err(DestinationError::Unsupported { url: url.to_owned() }),
        };
        Ok(Destination { url: url.to_owned(), store, prefix: Path::from(prefix.trim_matches('/')) })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> Path {
        match self.prefix.as_ref() {
            "" => Path::from(name),
            _ => self.prefix.child(name),
        }
    }

    fn err(&self, name: &str, source: object_store::Error) -> DestinationError {
        DestinationError::Store { url: format!("{}/{name}", self.url.trim_end_matches('/')), source }
    }

    /// Writes a small object whole.
    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), DestinationError> {
        self.store.put(&self.path(name), PutPayload::from(bytes)).await.map(|_| ()).map_err(|e| self.err(name, e))
    }

    /// Starts a large object, written in parts as it is produced.
    pub async fn create(&self, name: &str) -> Result<Upload, DestinationError> {
        let upload = self.store.put_multipart(&self.path(name)).await.map_err(|e| self.err(name, e))?;
        Ok(Upload { writer: WriteMultipart::new(upload), name: name.to_owned(), dest: self.clone() })
    }

    /// Whether the object exists.
    pub async fn exists(&self, name: &str) -> Result<bool, DestinationError> {
        match self.store.head(&self.path(name)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Deletes the object, best effort (a failed backup's partial files).
    pub async fn delete(&self, name: &str) {
        if let Err(e) = self.store.delete(&self.path(name)).await {
            tracing::warn!(object = name, error = %e, "could not delete a failed backup's file");
        }
    }

    /// Deletes every object under this destination (a backup dropped by retention), the manifest
    /// first, so that what is left of a backup interrupted midway is never taken for a whole one.
    /// Returns how many objects were deleted.
    pub async fn delete_all(&self) -> Result<usize, DestinationError> {
        let listed: Vec<object_store::ObjectMeta> =
            self.store.list(Some(&self.prefix)).try_collect().await.map_err(|e| self.err("", e))?;
        let manifest = self.path(crate::format::MANIFEST);
        let (first, rest): (Vec<_>, Vec<_>) = listed.into_iter().partition(|o| o.location == manifest);
        for object in first.iter().chain(&rest) {
            match self.store.delete(&object.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err(object.location.as_ref(), e)),
            }
        }
        Ok(first.len() + rest.len())
    }

    /// A whole small object.
    pub async fn get(&self, name: &str) -> Result<Bytes, DestinationError> {
        let got = self.store.get(&self.path(name)).await.map_err(|e| self.err(name, e))?;
        got.bytes().await.map_err(|e| self.err(name, e))
    }

    /// A large object as a stream of chunks.
    pub async fn read(
        &self,
        name: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, DestinationError>>, DestinationError> {
        let got = self.store.get(&self.path(name)).await.map_err(|e| self.err(name, e))?;
        let (dest, name) = (self.clone(), name.to_owned());
        Ok(got.into_stream().map(move |chunk| chunk.map_err(|e| dest.err(&name, e))).boxed())
    }
}

/// An object being written in parts.
pub struct Upload {
    writer: WriteMultipart,
    name: String,
    dest: Destination,
}

impl Upload {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), DestinationError> {
        // Bounds the parts in flight (and so the memory a fast producer can take).
        self.writer.wait_for_capacity(4).await.map_err(|e| self.dest.err(&self.name, e))?;
        self.writer.write(bytes);
        Ok(())
    }

    pub async fn finish(self) -> Result<(), DestinationError> {
        self.writer.finish().await.map(|_| ()).map_err(|e| self.dest.err(&self.name, e))
    }

    /// Gives up the object: nothing of it stays.
    pub async fn abort(self) {
        if let Err(e) = self.writer.abort().await {
            tracing::warn!(object = %self.name, error = %e, "could not abort a partial upload");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::aws::AmazonS3ConfigKey;

    #[test]
    fn settings_are_named_as_the_environment_names_them() {
        let key: AmazonS3ConfigKey = config_key("s3://b", "AWS_ENDPOINT_URL").unwrap();
        assert_eq!(key, AmazonS3ConfigKey::Endpoint);
        let key: AmazonS3ConfigKey = config_key("s3://b", "AWS_SECRET_ACCESS_KEY").unwrap();
        assert_eq!(key, AmazonS3ConfigKey::SecretAccessKey);
        let unknown = config_key::<AmazonS3ConfigKey>("s3://b", "PASSWORD").unwrap_err();
        assert!(unknown.to_string().contains("\"PASSWORD\" is not a setting"), "{unknown}");
        assert!(matches!(Destination::open("ftp://x/y"), Err(DestinationError::Unsupported { .. })));
    }

    #[tokio::test]
    async fn a_directory_holds_what_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let dest = Destination::open(&format!("file://{}/nested/backup", dir.path().display())).unwrap();
        assert!(!dest.exists("manifest.json").await.unwrap());
        dest.put("manifest.json", b"{}".to_vec()).await.unwrap();
        let mut upload = dest.create("partition-0000.kvb").await.unwrap();
        upload.write(b"abc").await.unwrap();
        upload.write(b"def").await.unwrap();
        upload.finish().await.unwrap();
        assert_eq!(&dest.get("partition-0000.kvb").await.unwrap()[..], b"abcdef");
        assert!(dest.exists("manifest.json").await.unwrap());
    }
}
