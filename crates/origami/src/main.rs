//! The `origami` command-line tool.

mod cli;

fn main() -> anyhow::Result<()> {
    cli::run()
}
