//! `cmctl scenario push`: publishes a scenario directory, either to an OCI
//! registry in chall-manager's layout (`--artifact-type
//! application/vnd.ctfer-io.scenario`, one `application/vnd.ctfer-io.file`
//! layer per file) or, with `--upload`, through the API into the JetStream
//! object store. Prints the reference to give a challenge as its `scenario`.

use std::path::PathBuf;

use cm_core::oci::{self, Reference, config::OciArgs};
use reqwest::Method;
use serde_json::json;

use super::Ctx;
use crate::{error::CliError, output::View, progress};

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Push a scenario directory (it must hold a Pulumi.yaml; a Go program
    /// is compiled by the workers, or ship a prebuilt `main` named by
    /// `runtime.options.binary`).
    ///
    /// `cmctl scenario push ./web registry.example:5000/ctf/web:v1` pushes to
    /// an OCI registry; `cmctl scenario push ./web --upload` uploads it
    /// through the API. Either prints the reference, pinned to its digest.
    Push {
        /// The scenario directory.
        dir: PathBuf,
        /// Where to push: `registry/repository:tag`.
        #[arg(required_unless_present = "upload")]
        reference: Option<String>,
        /// Upload through the API (`POST /api/v1/scenario`, JetStream object
        /// store) instead of pushing to a registry.
        #[arg(long, conflicts_with = "reference")]
        upload: bool,
        #[command(flatten)]
        oci: OciArgs,
    },
}

pub async fn run(cmd: Cmd, ctx: &Ctx) -> Result<(), CliError> {
    let Cmd::Push {
        dir,
        reference,
        upload,
        oci,
    } = cmd;
    if !dir.join("Pulumi.yaml").is_file() {
        return Err(CliError::Usage(format!(
            "{} is not a scenario: it has no Pulumi.yaml",
            dir.display()
        )));
    }
    let pushed = match reference {
        Some(reference) if !upload => push_oci(&dir, &reference, &oci).await?,
        _ => upload_archive(ctx, &dir).await?,
    };
    ctx.printer.emit(json!({"scenario": pushed}), || {
        View::Text(format!(
            "pushed; use it as a challenge's scenario:\n{pushed}"
        ))
    });
    Ok(())
}

async fn push_oci(
    dir: &std::path::Path,
    reference: &str,
    args: &OciArgs,
) -> Result<String, CliError> {
    let r = Reference::parse(reference).map_err(|e| CliError::Usage(e.to_string()))?;
    let config = args
        .client_config()
        .map_err(|e| CliError::Usage(format!("OCI credentials: {e}")))?;
    let client = oci::Client::new(config);
    let label = format!("pushing {} to {reference}", dir.display());
    let digest = progress::spin(&label, async {
        oci::push(&client, dir, &r)
            .await
            .map_err(|e| CliError::Unavailable(format!("push to {reference} failed: {e}")))
    })
    .await?;
    let repo = format!("{}/{}", r.registry, r.repository);
    Ok(match &r.tag {
        Some(tag) => format!("{repo}:{tag}@{digest}"),
        None => format!("{repo}@{digest}"),
    })
}

async fn upload_archive(ctx: &Ctx, dir: &std::path::Path) -> Result<String, CliError> {
    let owned = dir.to_owned();
    let archive = tokio::task::spawn_blocking(move || cm_core::archive::pack_dir(&owned))
        .await
        .map_err(|e| CliError::Usage(format!("packing failed: {e}")))?
        .map_err(|e| CliError::Usage(format!("{}: {e}", dir.display())))?;
    let api = ctx.api()?;
    let label = format!("uploading {} ({} bytes)", dir.display(), archive.len());
    let answer = progress::spin(
        &label,
        api.post_bytes(Method::POST, &["api", "v1", "scenario"], archive),
    )
    .await?;
    answer
        .get("scenario")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            CliError::Unavailable(format!("the API answered without a reference: {answer}"))
        })
}
