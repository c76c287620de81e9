//! The tiered expert cache (`moe-cache`) behind the engine: with budgets of 25 %, 50 % and
//! 100 % of the routed-expert bytes and every policy, greedy tokens are those of the
//! fully-resident run and of transformers; the statistics add up; the bytes held (resident,
//! in use, being read) never exceed the budget, across fixtures and threads; a budget below
//! one expert's read fails at load naming the minimum.

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moe_cache::{ExpertBudget, PolicyKind, TierCosts, TieredExpertsBuilder};
use moe_core::Routing;
use moe_engine::{Engine, EngineOptions, ExpertCacheStats};
use moe_models::{
    load_decoder, ForwardContext, LoadOptions, LogitsWanted, RoutingObserver, SequenceInput,
};
use moe_tests::{fixture_dir, greedy, greedy_decoder, Reference};

fn engine(
    name: &str,
    budget: Option<ExpertBudget>,
    policy: PolicyKind,
) -> moe_core::Result<Engine> {
    Engine::load(&EngineOptions {
        model: Some(fixture_dir(name).display().to_string()),
        expert_budget: budget,
        expert_policy: policy,
        ..Default::default()
    })
}

/// The smallest budget `name` loads with (one expert's read), from a 100 % cache's statistics.
fn minimum_budget(name: &str) -> u64 {
    let cache = engine(name, Some(ExpertBudget::Percent(100.0)), PolicyKind::Lru).unwrap();
    cache.expert_cache_stats().unwrap().min_budget_bytes
}

/// Invariants every snapshot must satisfy (after `wait_idle`: no read half-counted).
fn check_consistent(name: &str, s: &ExpertCacheStats, expert_bytes: u64, threads: bool) {
    assert_eq!(
        s.hits + s.misses + s.computed_in_place,
        s.lookups,
        "{name}: hits + misses + computed in place"
    );
    let histogram: u64 = s.layer_usage.iter().flat_map(|l| &l.counts).sum();
    assert_eq!(
        histogram, s.lookups,
        "{name}: usage histogram sums to the lookups"
    );
    assert!(
        s.resident_bytes <= s.budget_bytes,
        "{name}: resident over budget"
    );
    assert!(
        s.peak_bytes <= s.budget_bytes,
        "{name}: peak {} over budget {}",
        s.peak_bytes,
        s.budget_bytes
    );
    // A read reserves its buffers and decoded weights: the peak is at least one read's worth.
    assert!(
        s.peak_bytes >= s.min_budget_bytes,
        "{name}: peak counts reads"
    );
    assert!(
        s.min_budget_bytes > expert_bytes,
        "{name}: a read holds more than the weights"
    );
    // Only a full cache evicts: after the last eviction, the expert read fit only just (with
    // one reader at a time; reads overlapping an eviction free their extra transient bytes
    // when they land).
    let one_reader = s.policy != "prefetch" && !threads;
    assert!(
        !one_reader || s.evictions == 0 || s.resident_bytes + s.min_budget_bytes > s.budget_bytes,
        "{name}: evicted with room to spare"
    );
    // Every read (lookup miss or prefetch) reads exactly one expert's three matrices (f32 on
    // disk, f32 in RAM).
    assert_eq!(
        s.bytes_read,
        (s.misses + s.rereads + s.prefetches) * expert_bytes,
        "{name}: bytes read"
    );
    assert!(
        threads || s.rereads == 0,
        "{name}: one caller never rereads"
    );
    assert_eq!(
        s.resident_bytes,
        s.resident_experts as u64 * expert_bytes,
        "{name}: resident bytes"
    );
    // What is resident is what came in minus what went out.
    assert_eq!(
        s.misses + s.rereads + s.prefetches - s.evictions,
        s.resident_experts as u64,
        "{name}: reads − evictions = resident"
    );
    assert_eq!(
        s.prefetches,
        s.prefetch_hits + s.prefetch_wasted + s.prefetch_pending,
        "{name}: every prefetch is used, wasted or pending"
    );
    assert!(s.prefetch_late <= s.prefetch_hits);
    assert!(s.guessed_correctly <= s.guessed_layer_experts);
    assert!(s.tokens > 0, "{name}: tokens counted");
    assert_eq!(s.bytes_per_token, s.bytes_read as f64 / s.tokens as f64);
    if s.policy == "prefetch" {
        assert!(s.guessed_layer_experts > 0, "{name}: layers were guessed");
    } else {
        assert_eq!((s.prefetches, s.guessed_layer_experts), (0, 0), "{name}");
    }
}

/// The engine's cache statistics once its loader is idle.
fn settled_stats(engine: &Engine) -> ExpertCacheStats {
    let cache = engine.expert_cache().unwrap();
    cache.wait_idle();
    cache.stats()
}

// Every MoE fixture in f32, per-expert and stacked (GPT-OSS, Granite) layouts, in groups that
// run in parallel.

#[test]
fn budgets_generate_the_resident_tokens_mixtral_qwen() {
    check_budgets(&[
        "mixtral",
        "qwen3_moe",
        "qwen3_moe-nonorm",
        "qwen2_moe",
        "qwen2_moe-normtopk",
    ]);
}

#[test]
fn budgets_generate_the_resident_tokens_olmoe_phimoe() {
    check_budgets(&["olmoe", "olmoe-normtopk", "phimoe"]);
}

#[test]
fn budgets_generate_the_resident_tokens_deepseek() {
    check_budgets(&[
        "deepseek_v2",
        "deepseek_v2-lite",
        "deepseek_v3",
        "deepseek_v3-nonorm",
    ]);
}

#[test]
fn budgets_generate_the_resident_tokens_stacked_layouts() {
    check_budgets(&["gpt_oss", "granitemoe"]);
}

/// For each fixture, budget (25, 50, 100 %) and policy: greedy tokens equal the resident run's,
/// which equal transformers'; statistics consistent after every request. Prints hit rates
/// (`--nocapture`).
fn check_budgets(fixtures: &[&str]) {
    let mut report = Vec::new();
    for &name in fixtures {
        let reference = Reference::load(name).unwrap();
        let resident = engine(name, None, PolicyKind::Lru).unwrap();
        assert!(resident.expert_cache_stats().is_none());
        let expected: Vec<Vec<u32>> = reference
            .prompts
            .iter()
            .map(|p| greedy(&resident, &p.input_ids, p.greedy_new_tokens.len()))
            .collect();
        for (p, tokens) in reference.prompts.iter().zip(&expected) {
            assert_eq!(
                tokens, &p.greedy_new_tokens,
                "{name}: resident run vs transformers"
            );
        }
        let total = resident.model().experts().resident_bytes() as u64;
        let n_experts: usize = resident.summary().n_experts * resident.summary().moe_layers.len();
        let expert_bytes = total / n_experts as u64;
        for policy in [
            PolicyKind::Lru,
            PolicyKind::LfuDecay,
            PolicyKind::NextUse,
            PolicyKind::Prefetch,
        ] {
            for percent in [25.0, 50.0, 100.0] {
                let budget = ExpertBudget::Percent(percent);
                let minimum = minimum_budget(name);
                if budget.resolve(total) < minimum {
                    // Too few experts for 25 % to hold one read: must be refused.
                    let err = engine(name, Some(budget), policy)
                        .err()
                        .unwrap()
                        .to_string();
                    assert!(
                        err.contains(&format!("the minimum is {minimum} bytes")),
                        "{err}"
                    );
                    report.push(format!(
                        "{name:>20} {policy:>9} {percent:>5}%: below the minimum"
                    ));
                    continue;
                }
                let cached = engine(name, Some(budget), policy)
                    .unwrap_or_else(|e| panic!("{name} {percent}%: {e}"));
                let start = cached.expert_cache_stats().unwrap();
                assert_eq!(start.lookups, 0, "{name}: nothing is read at load");
                assert_eq!(start.resident_bytes, 0);
                assert_eq!(start.expert_bytes_total, total);
                assert_eq!(start.budget_bytes, (total as f64 * percent / 100.0) as u64);
                for (p, want) in reference.prompts.iter().zip(&expected) {
                    let got = greedy(&cached, &p.input_ids, want.len());
                    assert_eq!(&got, want, "{name}, {policy}, budget {percent}%");
                    check_consistent(name, &settled_stats(&cached), expert_bytes, false);
                }
                let s = settled_stats(&cached);
                let used = s
                    .layer_usage
                    .iter()
                    .flat_map(|l| &l.counts)
                    .filter(|&&c| c > 0)
                    .count();
                // With prefetch, guessed experts no lookup used are resident too, and the
                // loader's read may be in flight beside a lookup's.
                let (unused, reads) = if policy == PolicyKind::Prefetch {
                    (s.prefetch_wasted + s.prefetch_pending, 2)
                } else {
                    (0, 1)
                };
                if percent == 100.0
                    && (used as u64 + unused) * expert_bytes + reads * minimum <= s.budget_bytes
                {
                    // Every expert read and the reads in flight fit: each used expert is read
                    // once, by its first lookup or ahead of it.
                    assert_eq!(s.evictions, 0, "{name}: everything fits");
                    assert_eq!(
                        s.misses + s.prefetch_hits,
                        used as u64,
                        "{name}: each used expert read once"
                    );
                } else {
                    assert!((s.misses + s.prefetch_hits) as usize >= used);
                }
                report.push(format!(
                    "{name:>20} {policy:>9} {percent:>5}%: hit rate {:5.1} % ({} lookups, {} evictions, guess accuracy {:5.1} %)",
                    100.0 * s.hit_rate,
                    s.lookups,
                    s.evictions,
                    100.0 * s.guess_accuracy
                ));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// Counts, per forward pass and layer, the distinct experts any row was routed to: exactly the
/// `ExpertSource::expert` calls the MoE block makes.
#[derive(Default)]
struct DistinctExperts {
    total: u64,
}

impl RoutingObserver for DistinctExperts {
    fn on_routing(&mut self, _layer: usize, _logits: &Tensor, routing: &Routing) {
        let ids = routing.expert_ids.to_vec2::<u32>().unwrap();
        let distinct: BTreeSet<u32> = ids.into_iter().flatten().collect();
        self.total += distinct.len() as u64;
    }
}

#[test]
fn lookups_are_the_routed_experts() {
    for name in ["qwen3_moe", "deepseek_v3"] {
        let builder = Arc::new(TieredExpertsBuilder::new(
            ExpertBudget::Percent(30.0),
            PolicyKind::Lru,
        ));
        let model = cached_decoder(name, &builder);
        let cache = builder.built().unwrap();
        let reference = Reference::load(name).unwrap();
        let mut observer = DistinctExperts::default();
        let mut caches: Vec<_> = reference
            .prompts
            .iter()
            .map(|_| model.new_cache())
            .collect();
        // One batched prefill of every prompt, then a decode step.
        for step in 0..2 {
            let last: Vec<u32> = reference
                .prompts
                .iter()
                .map(|p| p.greedy_new_tokens[0])
                .collect();
            let mut batch: Vec<SequenceInput> = reference
                .prompts
                .iter()
                .zip(caches.iter_mut())
                .zip(&last)
                .map(|((p, cache), t)| SequenceInput {
                    tokens: if step == 0 {
                        &p.input_ids[..]
                    } else {
                        std::slice::from_ref(t)
                    },
                    cache,
                    logits: LogitsWanted::Last,
                })
                .collect();
            model
                .forward(
                    &mut batch,
                    ForwardContext {
                        observer: Some(&mut observer),
                    },
                )
                .unwrap();
        }
        let s = cache.stats();
        assert!(observer.total > 0);
        assert_eq!(
            s.lookups, observer.total,
            "{name}: one lookup per active expert per layer"
        );
        assert_eq!(s.hits + s.misses, observer.total);
        assert!(s.peak_bytes <= s.budget_bytes);
        assert!(s.evictions > 0, "{name}: 30 % forces evictions");
        cache.reset_stats();
        let s = cache.stats();
        assert_eq!((s.lookups, s.hits, s.misses, s.bytes_read), (0, 0, 0, 0));
    }
}

#[test]
fn too_small_budget_fails_at_load_naming_the_minimum() {
    for name in ["mixtral", "deepseek_v3"] {
        let resident = engine(name, None, PolicyKind::Lru).unwrap();
        let summary = resident.summary();
        let total = resident.model().experts().resident_bytes() as u64;
        let per_expert = total / (summary.n_experts * summary.moe_layers.len()) as u64;
        let minimum = minimum_budget(name);
        // Per-expert f32 layouts: the raw buffers and the weights, plus each of the three
        // raw buffers' direct-read alignment slack (two 4 KiB blocks).
        assert_eq!(minimum, 2 * per_expert + 3 * 2 * 4096, "{name}");
        let err = engine(
            name,
            Some(ExpertBudget::Bytes(minimum - 1)),
            PolicyKind::Lru,
        )
        .err()
        .unwrap_or_else(|| panic!("{name}: a budget of minimum − 1 loads"))
        .to_string();
        assert!(
            err.contains(&format!("the minimum is {minimum} bytes")),
            "{name}: {err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
        // Exactly the minimum loads and still generates the resident tokens.
        let tight = engine(
            name,
            Some(ExpertBudget::Bytes(minimum)),
            PolicyKind::LfuDecay,
        )
        .unwrap();
        let reference = Reference::load(name).unwrap();
        let p = &reference.prompts[0];
        assert_eq!(greedy(&tight, &p.input_ids, 10), p.greedy_new_tokens[..10]);
        let s = settled_stats(&tight);
        assert_eq!(
            s.peak_bytes, minimum,
            "{name}: a read takes the whole budget"
        );
        assert!(s.evictions > 0);
        assert_eq!(s.resident_experts, 1, "{name}: room for one expert");
    }
}

/// Threads sharing one engine share its cache: lookups of an expert being read wait for that
/// read; a thread that finds no room waits until others release the experts they compute with.
/// Tokens stay those of the resident run and the bytes held never exceed the budget, even
/// with a budget of a single read.
#[test]
fn threads_share_one_cache() {
    let name = "qwen3_moe";
    let reference = Reference::load(name).unwrap();
    let resident = engine(name, None, PolicyKind::Lru).unwrap();
    let summary = resident.summary();
    let total = resident.model().experts().resident_bytes() as u64;
    let per_expert = total / (summary.n_experts * summary.moe_layers.len()) as u64;
    let minimum = ExpertBudget::Bytes(minimum_budget(name));
    for (budget, policy, rounds) in [
        (ExpertBudget::Percent(25.0), PolicyKind::Lru, 4),
        (ExpertBudget::Percent(25.0), PolicyKind::Prefetch, 2),
        (minimum, PolicyKind::Prefetch, 1),
        (minimum, PolicyKind::LfuDecay, 1),
        (minimum, PolicyKind::NextUse, 1),
    ] {
        let cached = engine(name, Some(budget), policy).unwrap();
        std::thread::scope(|scope| {
            for round in 0..rounds {
                for p in &reference.prompts {
                    let cached = &cached;
                    scope.spawn(move || {
                        let n = 10 + round;
                        let got = greedy(cached, &p.input_ids, n);
                        assert_eq!(got, p.greedy_new_tokens[..n], "{budget} {policy}");
                    });
                }
            }
        });
        let s = settled_stats(&cached);
        check_consistent(name, &s, per_expert, true);
        assert!(s.peak_bytes <= s.budget_bytes);
    }
}

/// Routing-aware prefetch with room for every expert: guessed experts are read ahead, lookups
/// then hit them, and the guess (the next layer's router on the residual stream after this
/// layer's attention) is mostly right.
#[test]
fn prefetch_reads_ahead_and_guesses() {
    for name in ["mixtral", "qwen3_moe"] {
        let reference = Reference::load(name).unwrap();
        let minimum = minimum_budget(name);
        let resident = engine(name, None, PolicyKind::Lru).unwrap();
        // Every expert, plus two reads in flight at once (the loader's and a lookup's).
        let all =
            ExpertBudget::Bytes(resident.model().experts().resident_bytes() as u64 + 2 * minimum);
        let lru = engine(name, Some(all), PolicyKind::Lru).unwrap();
        let ahead = engine(name, Some(all), PolicyKind::Prefetch).unwrap();
        for p in &reference.prompts {
            let n = p.greedy_new_tokens.len();
            assert_eq!(
                greedy(&ahead, &p.input_ids, n),
                greedy(&lru, &p.input_ids, n)
            );
        }
        let (l, a) = (settled_stats(&lru), settled_stats(&ahead));
        assert_eq!(a.lookups, l.lookups, "{name}: same routing");
        assert_eq!(
            (a.evictions, l.evictions),
            (0, 0),
            "{name}: everything fits"
        );
        assert!(a.prefetch_hits > 0, "{name}: {a:?}");
        assert!(a.misses < l.misses, "{name}: prefetch hits replace misses");
        assert!(a.hit_rate > l.hit_rate, "{name}");
        assert!(
            a.guess_accuracy > 0.5,
            "{name}: guess accuracy {}",
            a.guess_accuracy
        );
        eprintln!(
            "{name}: lru hit rate {:.3}, prefetch hit rate {:.3}, guess accuracy {:.3}",
            l.hit_rate, a.hit_rate, a.guess_accuracy
        );
    }
}

/// A decoder of fixture `name` (f32, CPU) over two tiers: a cache of `upper` standing for the
/// GPU (here on the CPU device: no GPU on this machine) over an LRU host-RAM cache of `host`.
fn two_tier_model(
    name: &str,
    upper: ExpertBudget,
    host: ExpertBudget,
    policy: PolicyKind,
    placement: Option<TierCosts>,
) -> (moe_models::DecoderModel, Arc<TieredExpertsBuilder>) {
    let builder = Arc::new(
        TieredExpertsBuilder::new(upper, policy)
            .with_host_tier(host, Device::Cpu)
            .with_placement(placement),
    );
    (cached_decoder(name, &builder), builder)
}

/// A decoder of fixture `name` (f32, CPU) whose routed experts come from `builder`'s cache.
fn cached_decoder(name: &str, builder: &Arc<TieredExpertsBuilder>) -> moe_models::DecoderModel {
    let options = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        expert_source: Some(builder.clone()),
        expert_dtype: Default::default(),
        dense_dtype: Default::default(),
    };
    load_decoder(&fixture_dir(name), &options, false).unwrap()
}

/// Bytes of one expert, from a cache's statistics (all experts of a fixture are alike).
fn per_expert_bytes(s: &ExpertCacheStats) -> u64 {
    let n_experts: u64 = s.layer_usage.iter().map(|l| l.counts.len() as u64).sum();
    s.expert_bytes_total / n_experts
}

/// Fiddler through the two tiers (the CPU standing in for the GPU): with costs that make one
/// row cheaper to compute on the host than the expert is to copy and a prefill's many rows
/// dearer, decode steps compute their missed experts in place and prefill fetches. Tokens
/// stay the resident run's; every in-place lookup is one host lookup and moves no weights.
#[test]
fn missed_experts_with_few_rows_are_computed_on_the_host() {
    let name = "qwen3_moe";
    let reference = Reference::load(name).unwrap();
    // f32 experts of B bytes do B/2 FLOPs per row. A 1 GB/s link against a host that streams
    // at 20 GB/s and computes at 1 GFLOP/s: in place costs about B/2 ns per row, a fetch B ns,
    // so one row stays on the host and two or more fetch.
    let costs = TierCosts {
        link_bytes_per_s: 1e9,
        lower_memory_bytes_per_s: 20e9,
        lower_flops: 1e9,
        upper_flops: 1e12,
    };
    let run = |placement: Option<TierCosts>| {
        let (model, builder) = two_tier_model(
            name,
            ExpertBudget::Percent(25.0),
            ExpertBudget::Percent(100.0),
            PolicyKind::Lru,
            placement,
        );
        for p in &reference.prompts {
            let got = greedy_decoder(&model, &p.input_ids, p.greedy_new_tokens.len());
            assert_eq!(got, p.greedy_new_tokens, "placement {placement:?}");
        }
        let (upper, host) = (builder.built().unwrap(), builder.built_host().unwrap());
        upper.wait_idle();
        (upper.stats(), host.stats())
    };
    let (u, h) = run(Some(costs));
    let (fetch_only, _) = run(None);
    assert!(u.computed_in_place > 0, "decode misses computed in place");
    assert!(u.misses > 0, "prefill misses fetched");
    assert!(u.rows_in_place >= u.computed_in_place);
    assert!(
        u.rows_in_place == u.computed_in_place,
        "only one-row experts stay on the host"
    );
    assert_eq!(u.hits + u.misses + u.computed_in_place, u.lookups);
    assert_eq!(
        h.lookups,
        u.misses + u.computed_in_place,
        "one host lookup per fetch or in-place compute"
    );
    assert_eq!(
        u.bytes_read,
        u.misses * per_expert_bytes(&u),
        "in place moves no weights"
    );
    assert_eq!(fetch_only.computed_in_place, 0);
    assert_eq!(fetch_only.lookups, u.lookups, "the same lookups either way");
    assert!(
        u.bytes_read < fetch_only.bytes_read,
        "computing in place copies less: {} vs {}",
        u.bytes_read,
        fetch_only.bytes_read
    );
}

/// Two tiers through the same cache code: a cache standing for the GPU (here on the CPU
/// device: no GPU on this machine) over an LRU host-RAM cache over the files. Tokens stay the
/// resident run's; each tier stays within its own budget; every load of the upper tier is one
/// lookup of the host tier.
#[test]
fn device_tier_over_host_tier() {
    let name = "qwen3_moe";
    let reference = Reference::load(name).unwrap();
    for policy in [PolicyKind::Lru, PolicyKind::Prefetch] {
        let (model, builder) = two_tier_model(
            name,
            ExpertBudget::Percent(25.0),
            ExpertBudget::Percent(50.0),
            policy,
            None,
        );
        let (upper, host) = (builder.built().unwrap(), builder.built_host().unwrap());
        for p in &reference.prompts {
            let got = greedy_decoder(&model, &p.input_ids, p.greedy_new_tokens.len());
            assert_eq!(got, p.greedy_new_tokens, "{policy}");
        }
        upper.wait_idle();
        let (u, h) = (upper.stats(), host.stats());
        assert!(u.peak_bytes <= u.budget_bytes && h.peak_bytes <= h.budget_bytes);
        assert_eq!(u.expert_bytes_total, h.expert_bytes_total);
        assert!(u.budget_bytes < h.budget_bytes);
        assert_eq!(
            h.lookups,
            u.misses + u.prefetches,
            "{policy}: one host lookup per load"
        );
        let per_expert = per_expert_bytes(&u);
        assert_eq!(
            u.bytes_read,
            (u.misses + u.prefetches) * per_expert,
            "{policy}: copies up"
        );
        assert_eq!(
            h.bytes_read,
            h.misses * per_expert,
            "{policy}: reads from disk"
        );
        assert!(u.evictions > 0 && h.hits > 0, "{policy}: both tiers work");
    }
}

/// bf16 with the fast CPU kernels: under a budget the MoE block computes its experts in waves
/// (one at a time) that add up in f32, so the tokens equal the resident run's exactly. (The
/// resident bf16 run itself is held to transformers by tests/parity_fast.rs.)
#[test]
fn bf16_budgets_generate_the_resident_tokens() {
    for name in ["mixtral-bf16", "qwen3_moe-bf16"] {
        let load = |budget: Option<ExpertBudget>, policy| {
            Engine::load(&EngineOptions {
                model: Some(fixture_dir(name).display().to_string()),
                dtype: moe_engine::DtypeChoice::Bf16,
                expert_budget: budget,
                expert_policy: policy,
                ..Default::default()
            })
            .unwrap()
        };
        let reference = Reference::load(name).unwrap();
        let resident = load(None, PolicyKind::Lru);
        for p in &reference.prompts {
            let want = greedy(&resident, &p.input_ids, 12);
            for policy in [PolicyKind::Lru, PolicyKind::Prefetch] {
                for percent in [25.0, 50.0] {
                    let cached = load(Some(ExpertBudget::Percent(percent)), policy);
                    assert_eq!(
                        greedy(&cached, &p.input_ids, 12),
                        want,
                        "{name} {policy:?} {percent}%"
                    );
                }
            }
        }
    }
}
