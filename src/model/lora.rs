//! Owns LoRA adapters: `LoraConfig` (PEFT's `adapter_config.json`), `AdapterWeights`, `attach`.
//! Layer: model — may import the ground, linalg, backend and, in this folder, linear.rs,
//! weights.rs.
//!
//! A LoRA adapter (Hu et al. 2021, as the `peft` package saves it) adds s B A x to a linear
//! layer y = W x: A: [r, d_in], B: [d_out, r], s = α / r (α / √r with `use_rslora`), W frozen.
//! [`attach`] gives each targeted [`TrackedLinear`] a [`LoraBranch`] whose two linears carry
//! PEFT's tensor names, `base_model.model.MODULE.lora_A.weight` and `….lora_B.weight`
//! (MODULE: the module's path in the `transformers` model, e.g.
//! `model.layers.0.self_attn.q_proj`), so the adapter's parameters are exactly the tensors of
//! `adapter_model.safetensors`. GPT-2's Conv1D projections (weights stored [d_in, d_out],
//! PEFT's `fan_in_fan_out = true`) take adapters of the same shapes, A: [r, d_in] and
//! B: [d_out, r]; PEFT transposes only the merged ΔW = s B A to the Conv1D layout, and
//! [`TrackedLinear`] holds the weight as [d_out, d_in], so the flag changes nothing here (PEFT
//! itself overrides a wrong value by the layer's type, and so is it ignored on reading).
//! The options this tool does not implement (DoRA, adapter
//! biases, extra trained modules, per-layer ranks, …) are refused naming the field.

use candle_core::{Device, Tensor, Var};

use crate::config::{LoraTargets, LoraTrainConfig};
use crate::error::{Error, IoContext, Result};
use crate::util::rng::SplitMix64;

use super::linear::{LoraBranch, Param, TrackedLinear};
use super::weights::TensorSource;

/// PEFT's adapter configuration file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// A LoRA adapter's configuration (the fields of PEFT's `LoraConfig` this tool uses).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank r.
    pub r: usize,
    /// α (`lora_alpha`).
    pub alpha: f64,
    /// The targeted modules (`target_modules`).
    pub targets: LoraTargets,
    /// s = α / √r instead of α / r.
    pub use_rslora: bool,
    /// Dropout on the adapter's input during training (`lora_dropout`; kept for the record:
    /// the gradients attributed are those of the model without dropout).
    pub dropout: f64,
    /// `base_model_name_or_path`: a hub id or a local folder.
    pub base_model: Option<String>,
}

impl LoraConfig {
    /// The adapter a `[train.lora]` fine-tune trains.
    pub fn from_train(t: &LoraTrainConfig) -> Self {
        Self {
            r: t.r,
            alpha: t.alpha,
            targets: t.target_modules.clone(),
            use_rslora: t.use_rslora,
            dropout: 0.0,
            base_model: None,
        }
    }

    /// s: α / r, or α / √r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Reads `adapter_config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).ctx("reading", path)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: not valid JSON: {e}", path.display())))?;
        Self::from_json(&v, &path.display().to_string())
    }

    /// Parses a PEFT LoRA config; `origin` names it in errors. Refuses every option that
    /// changes the model beyond W + s B A (naming the field and how to proceed).
    pub fn from_json(v: &serde_json::Value, origin: &str) -> Result<Self> {
        use serde_json::Value;
        let bad =
            |field: &str, msg: String| Error::Model(format!("{origin}: field `{field}`: {msg}"));
        let obj = v
            .as_object()
            .ok_or_else(|| Error::Model(format!("{origin}: expected a JSON object")))?;
        let get = |k: &str| obj.get(k).filter(|x| !x.is_null());
        if let Some(t) = get("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(bad(
                    "peft_type",
                    format!("{t} is not supported; only LORA adapters are"),
                ));
            }
        }
        let unsupported = |field: &str, what: &str| {
            bad(
                field,
                format!(
                    "{} ({what}) is not supported; train the adapter without it",
                    obj[field]
                ),
            )
        };
        let truthy = |k: &str| get(k).is_some_and(|x| x.as_bool() == Some(true));
        let nonempty = |k: &str| {
            get(k).is_some_and(|x| match x {
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                Value::String(s) => !s.is_empty(),
                _ => true,
            })
        };
        if truthy("use_dora") {
            return Err(unsupported("use_dora", "DoRA's magnitude vectors"));
        }
        if truthy("lora_bias") {
            return Err(unsupported("lora_bias", "a bias on lora_B"));
        }
        if truthy("use_qalora") {
            return Err(unsupported("use_qalora", "quantisation-aware LoRA"));
        }
        if let Some(b) = get("bias") {
            if b.as_str() != Some("none") {
                return Err(bad(
                    "bias",
                    format!("{b} trains the base model's biases too; only \"none\" is supported"),
                ));
            }
        }
        for (k, what) in [
            ("modules_to_save", "fully trained extra modules"),
            ("rank_pattern", "per-layer ranks"),
            ("alpha_pattern", "per-layer α"),
            ("layers_to_transform", "a subset of the layers"),
            ("layers_pattern", "a subset of the layers"),
            ("exclude_modules", "excluded modules"),
            ("target_parameters", "adapters on parameters"),
            ("layer_replication", "replicated layers"),
            ("alora_invocation_tokens", "activated LoRA"),
            ("trainable_token_indices", "trained token embeddings"),
        ] {
            if nonempty(k) {
                return Err(unsupported(k, what));
            }
        }
        let r = get("r")
            .ok_or_else(|| bad("r", "is missing".into()))?
            .as_u64()
            .filter(|&r| r >= 1)
            .ok_or_else(|| bad("r", "must be a whole number ≥ 1".into()))? as usize;
        let alpha = match get("lora_alpha") {
            None => 8.0,
            Some(a) => a
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| bad("lora_alpha", format!("{a} is not a number")))?,
        };
        let targets = match get("target_modules") {
            None => {
                return Err(bad(
                    "target_modules",
                    "is missing (PEFT's per-architecture default); list the modules".into(),
                ))
            }
            Some(Value::String(s)) => LoraTargets::Pattern(s.clone()),
            Some(Value::Array(a)) => LoraTargets::Names(
                a.iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad("target_modules", format!("{x} is not a string")))
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(x) => {
                return Err(bad(
                    "target_modules",
                    format!("{x}: expected a list of names or a regex string"),
                ))
            }
        };
        let dropout = get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        Ok(Self {
            r,
            alpha,
            targets,
            use_rslora: truthy("use_rslora"),
            dropout,
            base_model: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// `adapter_config.json` as PEFT writes it (what `PeftModel.from_pretrained` reads),
    /// naming `base` as the base model.
    pub fn to_json(&self, base: &str) -> serde_json::Value {
        let targets = match &self.targets {
            LoraTargets::Names(n) => serde_json::json!(n),
            LoraTargets::Pattern(p) => serde_json::json!(p),
        };
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.r,
            "lora_alpha": self.alpha,
            "target_modules": targets,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": false,
            "bias": "none",
            "use_dora": false,
            "modules_to_save": null,
            "init_lora_weights": true,
            "inference_mode": true,
        })
    }
}

/// `target_modules` ready to match module paths.
enum Matcher {
    Names(Vec<String>),
    Regex(regex::Regex),
    AllLinear,
}

impl Matcher {
    fn new(t: &LoraTargets) -> Result<Self> {
        Ok(match t {
            LoraTargets::Names(n) => Matcher::Names(n.clone()),
            LoraTargets::Pattern(p) if p == "all-linear" => Matcher::AllLinear,
            LoraTargets::Pattern(p) => {
                Matcher::Regex(regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                    Error::Model(format!(
                        "LoRA target_modules regex `{p}` does not compile: {e}"
                    ))
                })?)
            }
        })
    }

    /// PEFT's rule: a name list matches the module or a `.`-suffix of it; a string is a
    /// regex for the whole path; `all-linear` takes every linear but the output head.
    fn matches(&self, module: &str, in_block: bool) -> bool {
        match self {
            Matcher::Names(n) => n
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            Matcher::Regex(r) => r.is_match(module),
            Matcher::AllLinear => in_block,
        }
    }
}

/// Where an adapter's A and B come from.
pub enum AdapterWeights<'a> {
    /// Tensors named as in `adapter_model.safetensors`.
    Source(&'a dyn TensorSource),
    /// PEFT's initialisation: A ~ U(−1/√d_in, 1/√d_in) (Kaiming-uniform with a = √5), one
    /// SplitMix64 stream per adapted layer of `seed`; B = 0.
    Fresh {
        /// Seed.
        seed: u64,
    },
}

/// PEFT's name of a module's adapter linear `which` (`lora_A` or `lora_B`).
pub fn adapter_name(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.{which}")
}

/// Gives every linear whose module path (`modules[i]`, the `transformers` path of
/// `linears[i]`) `cfg` targets an adapter, and freezes every linear. Returns the adapter
/// parameters (A then B per adapted layer, in order). Errors when nothing is targeted or a
/// tensor is missing or misshapen.
pub(crate) fn attach(
    linears: &mut [&mut TrackedLinear],
    modules: &[String],
    cfg: &LoraConfig,
    weights: &AdapterWeights<'_>,
    device: &Device,
) -> Result<Vec<Param>> {
    let matcher = Matcher::new(&cfg.targets)?;
    let mut params = Vec::new();
    for (i, (l, module)) in linears.iter_mut().zip(modules).enumerate() {
        l.frozen = true;
        if !matcher.matches(module, l.in_block) {
            continue;
        }
        let (d_in, d_out, r) = (l.d_in(), l.d_out(), cfg.r);
        let (na, nb) = (
            adapter_name(module, "lora_A"),
            adapter_name(module, "lora_B"),
        );
        let (a, b) = match weights {
            AdapterWeights::Source(s) => (
                s.get(&format!("{na}.weight"), &[r, d_in], device)?,
                s.get(&format!("{nb}.weight"), &[d_out, r], device)?,
            ),
            AdapterWeights::Fresh { seed } => {
                let bound = 1.0 / (d_in as f64).sqrt();
                let mut rng = SplitMix64::stream(*seed, i as u64);
                let v: Vec<f32> = (0..r * d_in)
                    .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
                    .collect();
                (
                    Tensor::from_vec(v, (r, d_in), device)?,
                    Tensor::zeros((d_out, r), candle_core::DType::F32, device)?,
                )
            }
        };
        let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        for (n, v) in [(&na, &a), (&nb, &b)] {
            params.push(Param {
                name: format!("{n}.weight"),
                var: v.clone(),
                transposed_from_checkpoint: false,
            });
        }
        l.lora = Some(Box::new(LoraBranch {
            a: TrackedLinear::from_weight(&na, a, l.in_block),
            b: TrackedLinear::from_weight(&nb, b, l.in_block),
            scale: cfg.scale(),
        }));
    }
    if params.is_empty() {
        let examples: Vec<&str> = modules.iter().take(4).map(String::as_str).collect();
        return Err(Error::Model(format!(
            "LoRA target_modules {:?} match no linear layer; module paths look like: {}",
            cfg.targets,
            examples.join(", ")
        )));
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn peft_matching_rules() {
        let names = Matcher::new(&LoraTargets::Names(vec!["q_proj".into()])).unwrap();
        assert!(names.matches("model.layers.0.self_attn.q_proj", true));
        assert!(!names.matches("model.layers.0.self_attn.qq_proj", true));
        let re = Matcher::new(&LoraTargets::Pattern(r".*\.(q|v)_proj".into())).unwrap();
        assert!(re.matches("model.layers.1.self_attn.v_proj", true));
        assert!(!re.matches("model.layers.1.self_attn.v_proj.x", true));
        let all = Matcher::new(&LoraTargets::Pattern("all-linear".into())).unwrap();
        assert!(all.matches("model.layers.1.mlp.up_proj", true));
        assert!(!all.matches("lm_head", false));
    }

    #[test]
    fn config_round_trip_and_refusals() {
        let c = LoraConfig {
            r: 4,
            alpha: 8.0,
            targets: LoraTargets::Names(vec!["q_proj".into()]),
            use_rslora: true,
            dropout: 0.0,
            base_model: None,
        };
        let back = LoraConfig::from_json(&c.to_json("/b"), "x").unwrap();
        assert_eq!(back.base_model.as_deref(), Some("/b"));
        assert_eq!(
            LoraConfig {
                base_model: None,
                ..back
            },
            c
        );
        assert_eq!(c.scale(), 4.0);
        let base = json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]});
        for (k, v, want) in [
            ("use_dora", json!(true), "use_dora"),
            ("bias", json!("all"), "bias"),
            ("modules_to_save", json!(["lm_head"]), "modules_to_save"),
            ("rank_pattern", json!({"q_proj": 4}), "rank_pattern"),
            ("peft_type", json!("IA3"), "peft_type"),
            ("r", json!(0), "`r`"),
        ] {
            let mut v2 = base.clone();
            v2[k] = v;
            let e = LoraConfig::from_json(&v2, "cfg").unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("cfg"), "{k}: {e}");
        }
        let mut ok = base.clone();
        ok["modules_to_save"] = json!(null);
        ok["rank_pattern"] = json!({});
        assert_eq!(LoraConfig::from_json(&ok, "cfg").unwrap().scale(), 2.0);
    }
}
