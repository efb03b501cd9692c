use clap::Parser;

fn main() {
    let cli = prunescope::cli::Cli::parse();
    if let Err(e) = prunescope::cli::run(cli) {
        // One line: what failed, on which file and tensor.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
