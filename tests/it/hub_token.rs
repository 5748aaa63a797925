//! The hub access token is found where `huggingface_hub.get_token()` finds it (`HF_TOKEN`,
//! the file `HF_TOKEN_PATH`, `HF_HOME/token`, `$XDG_CACHE_HOME/huggingface/token`,
//! `~/.cache/huggingface/token`), checked against the Python library itself on the same
//! environments.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use source_tda::hub::token_from;

use crate::common::{reference_python, write};

/// `huggingface_hub.get_token()` in a process with exactly `vars` (and PATH) set.
fn python_token(py: &Path, vars: &HashMap<String, String>) -> Option<String> {
    let out = Command::new(py)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars)
        .args([
            "-c",
            "from huggingface_hub import get_token; print(get_token() or '', end='')",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap()).filter(|t| !t.is_empty())
}

/// One environment: what it shows, its variables, the token expected.
type Case<'a> = (&'a str, Vec<(&'a str, String)>, Option<&'a str>);

#[test]
fn token_lookup_matches_huggingface_hub() {
    let Some(py) = reference_python("token lookup against huggingface_hub") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let p = |rel: &str| d.path().join(rel).to_string_lossy().into_owned();
    write(
        &d.path().join("home/.cache/huggingface/token"),
        "hf_home_default\n",
    );
    write(&d.path().join("xdg/huggingface/token"), "hf_xdg");
    write(&d.path().join("hfhome/token"), "  hf_from_hf_home \n");
    write(&d.path().join("elsewhere/my-token"), "hf_from_token_path");
    let cases: Vec<Case> = vec![
        ("nothing anywhere", vec![("HOME", p("nobody"))], None),
        (
            "~/.cache",
            vec![("HOME", p("home"))],
            Some("hf_home_default"),
        ),
        (
            "XDG_CACHE_HOME",
            vec![("HOME", p("home")), ("XDG_CACHE_HOME", p("xdg"))],
            Some("hf_xdg"),
        ),
        (
            "HF_HOME beats XDG, HF_HUB_CACHE does not move the token",
            vec![
                ("HOME", p("home")),
                ("XDG_CACHE_HOME", p("xdg")),
                ("HF_HOME", p("hfhome")),
                ("HF_HUB_CACHE", p("cache")),
            ],
            Some("hf_from_hf_home"),
        ),
        (
            "HF_TOKEN_PATH beats HF_HOME",
            vec![
                ("HOME", p("home")),
                ("HF_HOME", p("hfhome")),
                ("HF_TOKEN_PATH", p("elsewhere/my-token")),
            ],
            Some("hf_from_token_path"),
        ),
        (
            "HF_TOKEN beats files",
            vec![
                ("HOME", p("home")),
                ("HF_TOKEN_PATH", p("elsewhere/my-token")),
                ("HF_TOKEN", " hf_env ".into()),
            ],
            Some("hf_env"),
        ),
        (
            "blank HF_TOKEN falls back to the file",
            vec![("HOME", p("home")), ("HF_TOKEN", "  ".into())],
            Some("hf_home_default"),
        ),
    ];
    for (what, vars, want) in cases {
        let vars: HashMap<String, String> =
            vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let ours = token_from(&|k| vars.get(k).cloned());
        assert_eq!(ours.as_deref(), want, "{what}");
        assert_eq!(
            ours,
            python_token(&py, &vars),
            "{what}: differs from huggingface_hub"
        );
    }
}
