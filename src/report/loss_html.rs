//! Owns `loss_section`: the report's fine-tuning loss plot.
//! Layer: report — may import every floor from the ground up to pipeline and, in this folder,
//! data.rs, svg.rs, text.rs.
//!
//! The fine-tune's loss as the report shows it: the loss J of every optimizer step, which
//! jumps from one mini-batch to the next, and the mean of each epoch, which shows the trend.

use super::data::LossCurve;
use super::svg::{scatter, Scatter};
use super::text::num;

/// The fine-tune's training loss: every step (thin line) and each epoch's mean (a thick
/// segment across the epoch's steps, its value on hover).
pub fn loss_section(loss: &LossCurve) -> String {
    let steps: Vec<(f64, f64)> = loss.steps.iter().map(|&(s, l)| (s as f64, l)).collect();
    let mut lines = vec![(steps, "#9aa3b5", 1.0)];
    let mut points = Vec::new();
    for (e, &(lo, hi, m)) in loss.epochs.iter().enumerate() {
        lines.push((vec![(lo as f64, m), (hi as f64, m)], "#d6604d", 3.0));
        points.push((
            (lo + hi) as f64 / 2.0,
            m,
            format!("epoch {}: mean loss {} (steps {lo}–{hi})", e + 1, num(m)),
        ));
    }
    let means: Vec<String> = loss.epochs.iter().map(|e| num(e.2)).collect();
    format!(
        "<section id=\"loss\"><h2>Fine-tuning loss</h2><div class=\"panel\"><div \
         class=\"plots\">{}</div><p class=\"note\">Grey: the loss J of each optimizer step \
         (one mini-batch, so it jumps between batches). Red: the mean of each epoch{}.</p>\
         </div></section>",
        scatter(&Scatter {
            title: "training loss per step and epoch mean",
            x_label: "optimizer step",
            y_label: "loss J",
            points,
            colour: "#d6604d",
            lines,
        }),
        if means.is_empty() {
            String::new()
        } else {
            format!(": {}", means.join(" → "))
        }
    )
}
