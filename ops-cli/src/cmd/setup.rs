//! `convctl setup`: apply (or `--check`) the declared topology.

use conv_nats::topology::{self, Topology};

use crate::cli::{Global, SetupArgs};
use crate::{Error, Outcome};

/// Connects, retrying until `wait` has passed (a server starting with us).
async fn connect_within(g: &Global, wait: std::time::Duration) -> Result<async_nats::jetstream::Context, Error> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let attempt = async {
            let js = crate::connect(g).await?;
            // JetStream answers only once the server (or its cluster) is ready.
            js.query_account().await.map_err(Error::js("JetStream does not answer"))?;
            Ok::<_, Error>(js)
        };
        match attempt.await {
            Ok(js) => return Ok(js),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                eprintln!("waiting for NATS: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

pub async fn run(g: &Global, args: &SetupArgs) -> Result<Outcome, Error> {
    let cfg = args.topology.topology()?;
    let js = connect_within(g, std::time::Duration::from_secs(args.wait)).await?;
    let topo = Topology::declare(&cfg);
    let report = if args.check { topology::check(&js, &topo).await? } else { topology::apply(&js, &topo).await? };
    let code = u8::from(args.check && !report.is_unchanged());
    let output = if g.json { crate::to_json(&report) } else { report.to_string() };
    Ok(Outcome { output, code })
}
