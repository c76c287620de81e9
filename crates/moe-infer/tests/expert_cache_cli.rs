//! `--expert-budget`, `--expert-policy` and `--stats` of `moe-infer generate`.

use std::process::Output;

use moe_tests::{fixture_dir, Reference};

mod common;
use common::{json_of, moe_infer};

fn generate(extra: &[&str]) -> Output {
    let reference = Reference::load("mixtral").unwrap();
    let ids: Vec<String> = reference.prompts[0]
        .input_ids
        .iter()
        .map(u32::to_string)
        .collect();
    let model = fixture_dir("mixtral").display().to_string();
    let ids = ids.join(",");
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "--token-ids",
        &ids,
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
    ];
    args.extend_from_slice(extra);
    moe_infer(&args)
}

#[test]
fn json_reports_the_cache_only_with_a_budget() {
    let resident = json_of(&generate(&["--json"]));
    assert!(resident.get("expert_cache").is_none());
    let want = &Reference::load("mixtral").unwrap().prompts[0].greedy_new_tokens[..12];
    let got: Vec<u32> = serde_json::from_value(resident["generated_token_ids"].clone()).unwrap();
    assert_eq!(got, want);
    for (budget, policy) in [
        ("25%", "lru"),
        ("50%", "lfu-decay"),
        ("50%", "prefetch"),
        ("1MiB", "lru"),
    ] {
        let cached = json_of(&generate(&[
            "--json",
            "--expert-budget",
            budget,
            "--expert-policy",
            policy,
        ]));
        assert_eq!(
            cached["generated_token_ids"], resident["generated_token_ids"],
            "{budget} {policy}"
        );
        let stats = &cached["expert_cache"];
        assert_eq!(stats["policy"], policy);
        let n = |k: &str| stats[k].as_u64().unwrap();
        assert!(n("lookups") > 0);
        assert_eq!(n("hits") + n("misses"), n("lookups"));
        assert!(n("peak_bytes") <= n("budget_bytes"));
        assert!(n("tokens") > 0);
        let per_token = stats["bytes_per_token"].as_f64().unwrap();
        assert_eq!(per_token, n("bytes_read") as f64 / n("tokens") as f64);
        for key in [
            "prefetches",
            "prefetch_hits",
            "prefetch_wasted",
            "stall_seconds",
        ] {
            assert!(stats.get(key).is_some(), "{key}");
        }
        if policy == "prefetch" {
            assert!(n("guessed_layer_experts") > 0);
        }
        assert!(stats["layer_usage"].as_array().unwrap().len() == 2);
    }
}

#[test]
fn stats_go_to_stderr() {
    let out = generate(&["--expert-budget", "50%", "--stats"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("hit rate"), "{stderr}");
    assert!(stderr.contains("expert usage layer"), "{stderr}");
    assert!(stderr.contains("/token"), "{stderr}");
    let out = generate(&[
        "--expert-budget",
        "50%",
        "--expert-policy",
        "prefetch",
        "--stats",
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("guess accuracy"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("expert cache"), "{stdout}");
}

#[test]
fn bad_budgets_are_one_line_errors() {
    for (budget, says) in [
        ("1000", "the minimum is"),
        ("12XB", "unknown unit"),
        ("150%", "at most 100"),
    ] {
        let out = generate(&["--expert-budget", budget]);
        assert!(!out.status.success(), "{budget}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{budget}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{budget}: {stderr}");
    }
    for (extra, says) in [
        (
            &["--expert-budget", "25%", "--host-budget", "50%"][..],
            "needs --device cuda",
        ),
        (&["--host-budget", "50%"][..], "give --expert-budget too"),
    ] {
        let out = generate(extra);
        assert!(!out.status.success(), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{extra:?}: {stderr}");
    }
    let out = generate(&["--expert-policy", "fifo", "--expert-budget", "50%"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("lru, lfu-decay, next-use or prefetch"));
}
