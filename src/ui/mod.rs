//! The desktop app (placeholder while the panels are written).
pub fn run_gui(_model: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    anyhow::bail!("gui not built yet")
}
