pub fn run(_root: &std::path::Path, _o: &Options) -> anyhow::Result<()> {
    Ok(())
}
#[derive(clap::Args)]
pub struct Options {}
