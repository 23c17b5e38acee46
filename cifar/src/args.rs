//! The command-line options of the download, shared by the binaries that read CIFAR-10
//! (`train`, `convert verify|eval`): `#[command(flatten)]` them into a clap parser.

use crate::{DownloadOptions, Fetch, Md5Digest, DOWNLOAD_MD5, DOWNLOAD_URL};

/// `--no-download`, `--cifar-url`, `--cifar-md5`, `--download-proxy`.
///
/// ```
/// use clap::Parser;
/// #[derive(Parser)]
/// struct Cli {
///     #[command(flatten)]
///     download: cifar::DownloadArgs,
/// }
/// let cli = Cli::parse_from(["x", "--cifar-url", "http://mirror/c.tar.gz"]);
/// let opts = cli.download.options();
/// assert_eq!((opts.url.as_str(), opts.fetch), ("http://mirror/c.tar.gz", cifar::Fetch::IfMissing));
/// assert_eq!(opts.md5.to_string(), cifar::DOWNLOAD_MD5);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct DownloadArgs {
    /// Never download CIFAR-10: fail when --data-dir is missing or empty (by default the
    /// archive is downloaded, MD5-checked and extracted there).
    #[arg(long)]
    pub no_download: bool,

    /// Where to download cifar-10-binary.tar.gz from when --data-dir is missing or empty (a
    /// mirror).
    #[arg(long, value_name = "URL", default_value = DOWNLOAD_URL)]
    pub cifar_url: String,

    /// The MD5 the archive at --cifar-url must have (checked before extracting).
    #[arg(long, value_name = "HEX", default_value = DOWNLOAD_MD5)]
    pub cifar_md5: Md5Digest,

    /// HTTP(S) proxy for the download, e.g. http://proxy:3128 (HTTPS_PROXY is not read).
    #[arg(long, value_name = "URL")]
    pub download_proxy: Option<String>,
}

impl DownloadArgs {
    /// The download the options describe (progress shown on stderr).
    pub fn options(&self) -> DownloadOptions {
        DownloadOptions {
            url: self.cifar_url.clone(),
            md5: self.cifar_md5,
            fetch: if self.no_download {
                Fetch::Never
            } else {
                Fetch::IfMissing
            },
            proxy: self.download_proxy.clone(),
            ..DownloadOptions::default()
        }
    }
}
