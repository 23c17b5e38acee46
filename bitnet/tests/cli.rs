//! The `bitnet` binary on the fixture model directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tokenizers::Tokenizer;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet")).args(args).output().unwrap()
}

const PROMPT: &str = "The quick brown fox jumps over the lazy dog.";

/// Greedy generation prints the prompt then transformers' greedy continuation (decoded by the
/// same tokenizer), and the throughput on stderr.
#[test]
fn greedy_run_prints_transformers_continuation() {
    let dir = fixture().join("tiny-bitnet-lm");
    let expected =
        candle_core::safetensors::load(fixture().join("expected.safetensors"), &candle_core::Device::Cpu).unwrap();
    let greedy: Vec<u32> = expected["greedy_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let n = greedy.len().to_string();
    let args = [
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        &n,
    ];
    let out = run(&[&args[..], &["--ignore-eos"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = tok.decode(&greedy, true).unwrap();
    assert_eq!(stdout, format!("{PROMPT}{text}\n"));
    assert!(
        stderr.contains("prompt: 29 tokens") && stderr.contains(&format!("decode: {n} tokens")),
        "{stderr}"
    );
    assert!(stderr.contains("tokens/s"), "{stderr}");

    // Without --ignore-eos it stops at the first EOS token (id 1 in this tokenizer).
    let first_eos = greedy.iter().position(|&t| t == 1).unwrap();
    let out = run(&args);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("decode: {} tokens", first_eos + 1)),
        "{stderr}"
    );
}

/// Sampling with a seed is reproducible.
#[test]
fn seeded_sampling_is_reproducible() {
    let dir = fixture().join("tiny-bitnet-lm");
    let args = [
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "10",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "5",
        "--ignore-eos",
    ];
    let (a, b) = (run(&args), run(&args));
    assert!(a.status.success() && b.status.success());
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = fixture().join("tiny-bitnet-lm");
    let dir = dir.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--model", "/nonexistent-model-dir", "--prompt", "x"], "config.json"),
        (&["--model", dir, "--prompt", "x", "--temperature=-1"], "temperature"),
        (
            &["--model", dir, "--prompt", "x", "--max-new-tokens", "100"],
            "max_position_embeddings",
        ),
        (&["--model", dir, "--prompt", "x", "--device", "tpu"], "tpu"),
        (
            &["--model", dir, "--prompt", "x", "--cuda-graph"],
            "--cuda-graph needs --device cuda",
        ),
    ];
    for (args, needle) in cases {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
