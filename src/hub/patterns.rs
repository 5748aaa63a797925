//! Owns data-file patterns as the `datasets` library resolves them: `glob_match`, `resolve`,
//! `default_split_patterns` and the format inference `infer_module`.
//! Layer: hub — may import the ground, linalg, backend, model and data; no sibling.
//!
//! A pattern is matched against a repo's file names relative to a base folder (the repo
//! root, or a config's `data_dir`), with fsspec's glob rules: `*` and `?` stay inside one
//! path segment, `[...]` is a character class (`[!...]` negated), and a segment `**` matches
//! zero or more whole segments. Hidden files and folders (`.x`) and special folders (`__x`)
//! match only when the pattern names them; `README.md`, `config.json`, `dataset_info(s).json`
//! and a few more are never data. Only names with a data extension `datasets` knows are kept.

use std::collections::BTreeMap;

/// The extensions `datasets` treats as data files (any suffix of the name counts:
/// `train.json.gz` is a `.json` file), with the builder module each one infers.
const MODULES: &[(&str, &str)] = &[
    ("csv", ".csv .tsv"),
    ("json", ".json .jsonl .ndjson"),
    ("parquet", ".parquet .geoparquet .gpq"),
    ("arrow", ".arrow"),
    ("text", ".txt"),
    ("conll", ".conll .conllu"),
    ("webdataset", ".tar"),
    ("xml", ".xml"),
    ("hdf5", ".hdf5 .h5"),
    ("eval", ".eval"),
    ("harbor", ".toml .md"),
    ("lance", ".lance"),
    ("tsfile", ".tsfile"),
    ("vortex", ".vortex"),
    ("fasta", ".fa .fasta .fna .ffn .faa .frn .afa"),
    ("genbank", ".gb .gbk .genbank"),
    ("fastq", ".fq .fastq"),
    ("pdb", ".pdb .ent .PDB .ENT"),
    ("mmcif", ".cif .mmcif"),
    (
        "imagefolder",
        ".png .jpg .jpeg .gif .bmp .tif .tiff .webp .ico .ppm .pgm .pbm .pnm .tga .psd .jp2 \
         .PNG .JPG .JPEG .GIF .BMP .TIF .TIFF .WEBP",
    ),
    (
        "audiofolder",
        ".wav .mp3 .flac .ogg .opus .aiff .au .m4v .webm .WAV .MP3 .FLAC .OGG",
    ),
    (
        "videofolder",
        ".mp4 .mov .avi .mkv .mpeg .MP4 .MOV .AVI .MKV",
    ),
    ("pdffolder", ".pdf .PDF"),
    ("niftifolder", ".nii .NII"),
    ("meshfolder", ".glb .gltf .ply .stl"),
    ("archive", ".zip .idx .manifest .txn"),
];

/// File names that are never data, whatever pattern matches them.
const FILES_TO_IGNORE: [&str; 6] = [
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dummy_data.zip",
    "dataset_dict.json",
];

/// The split keywords of `datasets`: a file or folder named with one belongs to that split.
const SPLIT_KEYWORDS: [(&str, &[&str]); 3] = [
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// The separators around a split keyword in a name.
const SEP: &str = "[-._ 0-9]";

/// Shard names `data/SPLIT-00000-of-00002.parquet`: any split name, checked first.
pub const SHARDED: &str = "data/*-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*";

fn suffixes(name: &str) -> impl Iterator<Item = String> + '_ {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.split('.').skip(1).map(|s| format!(".{s}"))
}

/// The module (`json`, `csv`, `parquet`, `text`, …) of an extension like `.jsonl`.
fn module_of_ext(ext: &str) -> Option<&'static str> {
    MODULES
        .iter()
        .find(|(_, exts)| exts.split_whitespace().any(|e| e == ext))
        .map(|(m, _)| *m)
}

/// Whether a file name has a data extension `datasets` knows.
fn has_data_extension(name: &str) -> bool {
    suffixes(name).any(|s| module_of_ext(&s).is_some())
}

/// Whether `name` is a data file to `datasets`: a known data extension, not hidden, not in
/// a special folder, not one of the [`FILES_TO_IGNORE`].
pub fn is_data_file(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    has_data_extension(name) && hidden_parts(name) == (0, 0) && !FILES_TO_IGNORE.contains(&base)
}

/// Whether `name` (one segment) matches the segment pattern `pat` (`*`, `?`, `[...]`).
fn segment_match(pat: &[char], name: &[char]) -> bool {
    match pat.first() {
        None => name.is_empty(),
        Some('*') => (0..=name.len()).any(|k| segment_match(&pat[1..], &name[k..])),
        Some('?') => !name.is_empty() && segment_match(&pat[1..], &name[1..]),
        Some('[') => {
            let Some(close) = pat.iter().skip(2).position(|&c| c == ']').map(|p| p + 2) else {
                return name.first() == Some(&'[') && segment_match(&pat[1..], &name[1..]);
            };
            let Some(&c) = name.first() else {
                return false;
            };
            let mut class = &pat[1..close];
            let negated = matches!(class.first(), Some('!') | Some('^'));
            if negated {
                class = &class[1..];
            }
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == '-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negated && segment_match(&pat[close + 1..], &name[1..])
        }
        Some(&p) => name.first() == Some(&p) && segment_match(&pat[1..], &name[1..]),
    }
}

fn path_match(pat: &[&str], name: &[&str]) -> bool {
    match pat.first() {
        None => name.is_empty(),
        // A trailing `**` matches the files below a folder, not the folder's name itself.
        Some(&"**") if pat.len() == 1 => !name.is_empty(),
        Some(&"**") => (0..=name.len()).any(|k| path_match(&pat[1..], &name[k..])),
        Some(p) => {
            // `**` inside a segment (`**.csv`) is a plain `*` in fsspec ≥ 2023.12.
            let p: Vec<char> = p.replace("**", "*").chars().collect();
            let n: Vec<char> = match name.first() {
                Some(n) => n.chars().collect(),
                None => return false,
            };
            segment_match(&p, &n) && path_match(&pat[1..], &name[1..])
        }
    }
}

/// Whether the relative file name `name` matches `pattern` (fsspec glob rules).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let pat: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    let parts: Vec<&str> = name.split('/').collect();
    path_match(&pat, &parts)
}

/// How many parts of a path are hidden (`.x`) or, for folders, special (`__x`).
fn hidden_parts(path: &str) -> (usize, usize) {
    let parts: Vec<&str> = path.split('/').collect();
    let hidden = parts
        .iter()
        .filter(|p| p.starts_with('.') && !p.chars().all(|c| c == '.'))
        .count();
    let special = parts[..parts.len().saturating_sub(1)]
        .iter()
        .filter(|p| p.starts_with("__"))
        .count();
    (hidden, special)
}

/// The names under `base` (relative to it) that `pattern` selects, sorted: data extensions
/// only, hidden and special parts only when the pattern names them, never the
/// [`FILES_TO_IGNORE`].
pub fn resolve(pattern: &str, relative_names: &[String]) -> Vec<String> {
    let pattern = pattern.trim_start_matches("./");
    let wanted = hidden_parts(pattern);
    let mut out: Vec<String> = relative_names
        .iter()
        .filter(|n| glob_match(pattern, n))
        .filter(|n| {
            let base = n.rsplit('/').next().unwrap_or(n);
            let pattern_base = pattern.rsplit('/').next().unwrap_or(pattern);
            !(FILES_TO_IGNORE.contains(&base) && base != pattern_base)
        })
        .filter(|n| hidden_parts(n) == wanted)
        .filter(|n| has_data_extension(n))
        .cloned()
        .collect();
    out.sort();
    out
}

/// Whether `pattern` has glob characters (a pattern without them names one file).
pub fn has_magic(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// The splits and their patterns `datasets` infers for files under a base folder (given
/// relative to it), in its order: shard names `data/SPLIT-0000N-of-0000M*.*` (any split
/// name), else the `**.eval` logs and harbor task files, else folders named after a split
/// keyword (`train/`, `partial-train/`, `dev/`, …), else file names with one
/// (`train.jsonl`, `my-train_0.csv`), else every file as `train`. `None`: no data file.
pub fn default_split_patterns(names: &[String]) -> Option<Vec<(String, Vec<String>)>> {
    let sharded = resolve(SHARDED, names);
    if !sharded.is_empty() {
        let mut splits: Vec<String> = Vec::new();
        for n in &sharded {
            let base = n.rsplit('/').next().unwrap_or(n);
            // `SPLIT-00000-of-00002…`: the split is what precedes the shard numbers.
            if let Some(split) = shard_split(base) {
                if !splits.contains(&split) {
                    splits.push(split);
                }
            }
        }
        let rank = |s: &String| {
            SPLIT_KEYWORDS
                .iter()
                .position(|(k, _)| k == s)
                .unwrap_or(SPLIT_KEYWORDS.len())
        };
        splits.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
        return Some(
            splits
                .into_iter()
                .map(|s| {
                    let p = SHARDED.replacen('*', &s, 1);
                    (s, vec![p])
                })
                .collect(),
        );
    }
    let keyword_sets = |bases: &[&str]| -> Vec<(String, Vec<String>)> {
        SPLIT_KEYWORDS
            .iter()
            .map(|(split, keywords)| {
                let patterns = keywords
                    .iter()
                    .flat_map(|k| bases.iter().map(move |b| b.replace("{k}", k)))
                    .map(|p| p.replace("{s}", SEP))
                    .collect();
                (split.to_string(), patterns)
            })
            .collect()
    };
    let sets: Vec<Vec<(String, Vec<String>)>> = vec![
        vec![("logs".into(), vec!["**/*.eval".into()])],
        vec![(
            "test".into(),
            vec!["**/task.toml".into(), "**/instruction.md".into()],
        )],
        keyword_sets(&[
            "**/{k}/**",
            "**/{k}{s}*/**",
            "**/*{s}{k}/**",
            "**/*{s}{k}{s}*/**",
        ]),
        keyword_sets(&["**/{k}{s}*", "**/*{s}{k}{s}*"]),
        vec![("train".into(), vec!["**".into()])],
    ];
    for set in sets {
        let found: Vec<(String, Vec<String>)> = set
            .into_iter()
            .filter(|(_, patterns)| patterns.iter().any(|p| !resolve(p, names).is_empty()))
            .collect();
        if !found.is_empty() {
            return Some(found);
        }
    }
    None
}

/// The split of a shard file name `SPLIT-00000-of-00002.ext` (`None` when it is not one).
fn shard_split(base: &str) -> Option<String> {
    let bytes = base.as_bytes();
    (0..bytes.len()).find_map(|i| {
        let rest = &base[i..];
        let tail = rest.strip_prefix('-')?;
        let digits = |s: &str| s.len() >= 5 && s[..5].bytes().all(|b| b.is_ascii_digit());
        (digits(tail) && tail[5..].starts_with("-of-") && digits(&tail[9..]))
            .then(|| base[..i].to_string())
    })
}

/// The builder module `datasets` infers from files: the most common extension among all
/// their suffixes, ties going to `.parquet`, `.lance`, `.vortex`, `.arrow`, `.jsonl`,
/// `.json`, `.csv`, then the greater extension; `None` when no suffix is a known one.
pub fn infer_module(files: &[String]) -> Option<&'static str> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for f in files {
        for s in suffixes(f) {
            *counts.entry(s.to_lowercase()).or_default() += 1;
        }
    }
    let favour = [
        ".parquet", ".lance", ".vortex", ".arrow", ".jsonl", ".json", ".csv",
    ];
    let key = |(ext, n): &(&String, &usize)| {
        let prefs: Vec<bool> = favour.iter().map(|f| *ext == f).collect();
        (**n, prefs, (*ext).clone())
    };
    let mut ranked: Vec<(&String, &usize)> = counts.iter().collect();
    ranked.sort_by_key(|e| std::cmp::Reverse(key(e)));
    ranked.into_iter().find_map(|(ext, _)| module_of_ext(ext))
}

/// Whether `file` has one of `module`'s extensions (as a suffix, or before a compression
/// suffix: `x.jsonl.gz`), or is a zip archive, as `datasets` filters a split's files.
pub fn of_module(file: &str, module: &str) -> bool {
    let Some((_, exts)) = MODULES.iter().find(|(m, _)| *m == module) else {
        return false;
    };
    exts.split_whitespace().chain([".zip"]).any(|ext| {
        file.match_indices(ext).any(|(i, _)| {
            let rest = &file[i + ext.len()..];
            rest.is_empty() || (rest.starts_with('.') && rest.len() > 1)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_rules() {
        assert!(glob_match("**/train/**", "train/a.parquet"));
        assert!(glob_match("**/train/**", "default/train/x/0.parquet"));
        assert!(!glob_match("**/train/**", "trainer/a.parquet"));
        assert!(!glob_match("**/eval[-._ 0-9]*/**", "eval.jsonl"));
        assert!(glob_match(
            "**/*[-._ 0-9]train/**",
            "default/partial-train/0000.parquet"
        ));
        assert!(glob_match("**/train[-._ 0-9]*", "train.jsonl"));
        assert!(!glob_match("**/train[-._ 0-9]*", "trainer.jsonl"));
        assert!(glob_match("data/*.csv", "data/a.csv"));
        assert!(!glob_match("data/*.csv", "data/sub/a.csv"));
        assert!(glob_match("[!x]?.json", "ab.json"));
        assert!(!glob_match("[!a]?.json", "ab.json"));
        assert!(glob_match(SHARDED, "data/train-00000-of-00002.parquet"));
        assert_eq!(
            shard_split("my-split-00001-of-00003.jsonl"),
            Some("my-split".to_string())
        );
    }

    #[test]
    fn module_ties_and_filters() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(infer_module(&f(&["a.jsonl", "b.csv"])), Some("json"));
        assert_eq!(
            infer_module(&f(&["a.csv", "b.csv", "c.jsonl"])),
            Some("csv")
        );
        assert_eq!(infer_module(&f(&["a.parquet", "b.jsonl"])), Some("parquet"));
        assert_eq!(infer_module(&f(&["a.py"])), None);
        assert!(of_module("x/train.jsonl.gz", "json"));
        assert!(!of_module("x/train.csv", "json"));
    }
}
