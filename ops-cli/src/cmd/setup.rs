//! `convctl setup`: apply (or `--check`) the declared topology.

use conv_nats::topology::{self, Topology};

use crate::cli::{Global, SetupArgs};
use crate::{Error, Outcome};

pub async fn run(g: &Global, args: &SetupArgs) -> Result<Outcome, Error> {
    let cfg = g.topology()?;
    let js = crate::connect(g).await?;
    let topo = Topology::declare(&cfg);
    let report = if args.check { topology::check(&js, &topo).await? } else { topology::apply(&js, &topo).await? };
    let code = u8::from(args.check && !report.is_unchanged());
    let output = if g.json { crate::to_json(&report) } else { report.to_string() };
    Ok(Outcome { output, code })
}
