//! SuperGLUE fine-tuning under real `mpirun` on the CPU (the `tiny` preset with a 1000-piece
//! tokenizer, random weights): CB trains, is evaluated with its metrics and writes a complete
//! `CB.jsonl`; 2 data-parallel ranks give the 1-rank run's metrics; SiFT adds exactly λ times
//! its adversarial loss and is off by default; non-finite steps are skipped on the device,
//! reported when the host logs and stop the run after `max_bad_steps`; bad task files are refused
//! with file and line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use deberta_data::fixtures::{shared, tiny_corpus};

fn tokenizer() -> &'static Path {
    &tiny_corpus().tokenizer
}

fn config(dir: &Path, name: &str, ranks: usize, train_extra: &str, more: &str) -> (PathBuf, PathBuf) {
    let out = dir.join(name);
    let yaml = format!(
        "run: {{name: {name}, output_dir: {out}, seed: 3}}
init: {{preset: tiny, vocab_size: 1000}}
task: {{name: CB, data_dir: {data}, tokenizer: {tok}, max_seq_len: 96}}
parallel: {{tensor: 1, data: {ranks}, backend: cpu}}
train: {{batch: 16, micro_batch: 4, epochs: 2, lr: 1.0e-3, warmup_steps: 2, dropout: 0.0, cls_dropout: 0.0,
        eval_every: 15, log_every: 1{train_extra}}}
{more}",
        out = out.display(),
        data = shared("superglue").display(),
        tok = tokenizer().display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    (path, out)
}

fn finetune(np: usize, cfg: &Path) -> Output {
    Command::new("mpirun")
        .args(["-np", &np.to_string(), env!("CARGO_BIN_EXE_deberta-worker"), "finetune"])
        .arg(cfg)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn series(m: &[serde_json::Value], key: &str) -> Vec<f64> {
    m.iter().filter_map(|v| v.get(key)?.as_f64()).collect()
}

#[test]
fn cb_trains_evaluates_and_predicts_and_two_ranks_match_one() {
    let dir = tempfile::tempdir().unwrap();
    let (one, out1) = config(dir.path(), "one", 1, "", "");
    let o = finetune(1, &one);
    assert!(o.status.success(), "{}", text(&o));
    let m = metrics(&out1);
    let loss = series(&m, "train/loss");
    assert_eq!(loss.len(), 30, "2 epochs x 15 steps");
    let (first, last) = (
        loss[..5].iter().sum::<f64>() / 5.0,
        loss[25..].iter().sum::<f64>() / 5.0,
    );
    assert!(last < first - 0.05, "training loss {first} -> {last}");
    let f1 = series(&m, "val/f1_macro");
    assert_eq!(f1.len(), 2, "val metrics at steps 15 and 30");
    assert!(series(&m, "val/accuracy").iter().all(|a| (0.0..=1.0).contains(a)));
    // The submission: every test item once, in order, with a CB label.
    let sub = std::fs::read_to_string(out1.join("predictions/CB.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = sub.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 250);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["idx"], i as i64);
        assert!(
            ["contradiction", "neutral", "entailment"].contains(&l["label"].as_str().unwrap()),
            "{l}"
        );
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out1.join("results.json")).unwrap()).unwrap();
    assert!(results["majority_baseline"]["f1_macro"].as_f64().is_some(), "{results}");
    assert!(checkpoints(&out1.join("best")) == 1);

    let (two, out2) = config(dir.path(), "two", 2, "", "");
    let o = finetune(2, &two);
    assert!(o.status.success(), "{}", text(&o));
    let m2 = metrics(&out2);
    for key in ["val/f1_macro", "val/accuracy"] {
        assert_eq!(series(&m2, key), series(&m, key), "{key}");
    }
    for (a, b) in series(&m2, "train/loss").iter().zip(&loss) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    assert_eq!(std::fs::read_to_string(out2.join("predictions/CB.jsonl")).unwrap(), sub);

    // Tensor parallelism: 2 ranks sharing the model, same numbers.
    let (tp2, out3) = config(dir.path(), "tp2", 2, "", "");
    std::fs::write(
        &tp2,
        std::fs::read_to_string(&tp2)
            .unwrap()
            .replace("{tensor: 1, data: 2,", "{tensor: 2, data: 1,"),
    )
    .unwrap();
    let o = finetune(2, &tp2);
    assert!(o.status.success(), "{}", text(&o));
    let m3 = metrics(&out3);
    assert_eq!(series(&m3, "val/f1_macro"), series(&m, "val/f1_macro"));
    for (a, b) in series(&m3, "train/loss").iter().zip(&loss) {
        assert!((a - b).abs() < 1e-5, "tp 2: {a} vs {b}");
    }
}

fn checkpoints(root: &Path) -> usize {
    std::fs::read_dir(root)
        .map(|d| d.flatten().filter(|e| e.path().join("manifest.json").is_file()).count())
        .unwrap_or(0)
}

#[test]
fn sift_adds_lambda_times_its_adversarial_loss_and_is_off_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, sift: &str| {
        let (cfg, out) = config(dir.path(), name, 1, ", max_steps: 1", sift);
        let o = finetune(1, &cfg);
        assert!(o.status.success(), "{}", text(&o));
        let m = metrics(&out);
        (
            series(&m, "train/loss")[0],
            series(&m, "train/adv_loss").first().copied(),
        )
    };
    let (plain, plain_adv) = run("plain", "");
    assert_eq!(plain_adv, None, "SiFT is off unless enabled");
    let (zero, _) = run("lambda0", "sift: {enabled: true, lambda: 0.0}\n");
    let (five, adv) = run("lambda5", "sift: {enabled: true, lambda: 5.0}\n");
    let adv = adv.unwrap();
    assert!(adv > 0.0, "{adv}");
    // Same clean pass (the perturbation is drawn after it): the difference is λ · L_adv.
    assert!((five - zero - 5.0 * adv).abs() < 1e-6, "{five} - {zero} vs 5 x {adv}");
    // SiFT's extra LayerNorm before the embedding LayerNorm changes the clean loss only by eps.
    assert!((zero - plain).abs() < 1e-3, "{zero} vs {plain}");
}

#[test]
fn non_finite_steps_are_skipped_on_the_device_reported_at_log_time_and_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, bad: &str| {
        let (cfg, out) = config(dir.path(), name, 2, ", max_steps: 6", "");
        let yaml = std::fs::read_to_string(&cfg).unwrap();
        assert!(yaml.contains("log_every: 1,"), "{yaml}");
        // Logged every 4 steps: the host reads the skip flags of steps 1-4 back at step 4.
        std::fs::write(&cfg, yaml.replace("log_every: 1,", "log_every: 4,")).unwrap();
        let o = Command::new("mpirun")
            .args(["-np", "2", env!("CARGO_BIN_EXE_deberta-worker"), "finetune"])
            .arg(&cfg)
            .env("DEBERTA_INJECT_NAN_STEPS", bad)
            .output()
            .unwrap();
        (o, out)
    };
    // Two bad steps in a row (of 3 allowed): both skipped, reported by number, counted.
    let (o, out) = run("two_bad", "1,2");
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for step in [2, 3] {
        assert!(
            err.contains(&format!("step {step}: non-finite loss NaN")),
            "step {step}:\n{err}"
        );
    }
    assert_eq!(err.matches("update skipped").count(), 2, "{err}");
    let m = metrics(&out);
    assert_eq!(series(&m, "train/skipped_steps"), [2.0, 2.0], "logged at steps 4 and 6");
    assert!(series(&m, "train/loss").iter().all(|l| l.is_finite()));
    // Three in a row (train.max_bad_steps = 3 by default) stop the run with an error.
    let (o, _) = run("three_bad", "1,2,3");
    assert!(!o.status.success());
    assert!(text(&o).contains("3 consecutive non-finite steps"), "{}", text(&o));
}

#[test]
fn bad_task_files_and_settings_are_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let copa_val = shared("superglue/COPA/val.jsonl");
    let cases = [
        // COPA's file given as CB's val split: a task/file mismatch.
        (
            format!("\n  val_file: {}", copa_val.display()),
            "",
            format!("{}:1: missing field `hypothesis`", copa_val.display()),
        ),
        (
            String::new(),
            ", max_steps: 0",
            "train.max_steps must be >= 1".to_string(),
        ),
    ];
    for (task_extra, train_extra, want) in cases {
        let (cfg, out) = config(dir.path(), "bad", 1, train_extra, "");
        let yaml = std::fs::read_to_string(&cfg).unwrap();
        let yaml = if task_extra.is_empty() {
            yaml
        } else {
            yaml.replace(
                "max_seq_len: 96}",
                &format!("max_seq_len: 96,{}}}", task_extra.trim_start_matches('\n')),
            )
        };
        std::fs::write(&cfg, yaml).unwrap();
        let o = finetune(1, &cfg);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains(&want), "{want} not in {}", text(&o));
        let _ = std::fs::remove_dir_all(out);
    }
    // An unknown label in a line: file and line named.
    let bad = dir.path().join("val.jsonl");
    std::fs::write(
        &bad,
        "{\"premise\": \"p\", \"hypothesis\": \"h\", \"label\": \"neutral\", \"idx\": 0}\n{\"premise\": \"p\", \"hypothesis\": \"h\", \"label\": \"perhaps\", \"idx\": 1}\n",
    )
    .unwrap();
    let (cfg, _) = config(dir.path(), "bad2", 1, "", "");
    let yaml = std::fs::read_to_string(&cfg).unwrap().replace(
        "max_seq_len: 96}",
        &format!("max_seq_len: 96, val_file: {}}}", bad.display()),
    );
    std::fs::write(&cfg, yaml).unwrap();
    let o = finetune(1, &cfg);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "{}:2: field `label`: unknown label \"perhaps\"",
            bad.display()
        )),
        "{}",
        text(&o)
    );
}

#[test]
fn an_hf_directory_initialises_the_backbone() {
    use deberta_model::{DebertaConfig, DebertaV2, Parts};
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let mut c = DebertaConfig::tiny();
    c.vocab_size = 1000;
    tch::manual_seed(11);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = DebertaV2::new(&vs.root(), &c, Parts::BACKBONE).unwrap();
    deberta_model::hf::save_hf_dir(&model, &vs, &hf).unwrap();
    // One step at a negligible learning rate: the saved weights are the HF ones.
    let (cfg, out) = config(dir.path(), "hf", 1, ", max_steps: 1", "");
    let yaml = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "init: {preset: tiny, vocab_size: 1000}",
            &format!("init: {{hf_dir: {}}}", hf.display()),
        )
        .replace("lr: 1.0e-3", "lr: 1.0e-12");
    std::fs::write(&cfg, yaml).unwrap();
    let o = finetune(1, &cfg);
    assert!(o.status.success(), "{}", text(&o));
    let best = out.join("best/step-00000001/tp-00.safetensors");
    let saved = tch::Tensor::read_safetensors(&best).unwrap();
    let hf_vars = vs.variables();
    let mut compared = 0;
    for (name, t) in saved.iter().filter(|(n, _)| n.starts_with("deberta.encoder.layer.")) {
        let diff = (t - &hf_vars[name]).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{name}: {diff}");
        compared += 1;
    }
    assert!(compared > 10, "{compared}");
}

#[test]
fn a_tp2_pretraining_checkpoint_initialises_a_tp1_fine_tune() {
    use deberta_model::tensor_parallel::concat_shards;
    let dir = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus();
    let pre = dir.path().join("pre");
    let pre_cfg = dir.path().join("pre.yaml");
    std::fs::write(
        &pre_cfg,
        format!(
            "run: {{name: pre, output_dir: {}, seed: 2}}
model: {{preset: tiny, vocab_size: 1000}}
parallel: {{tensor: 2, data: 1, backend: cpu}}
data: {{corpus: {}, tokenizer: {}, seq_len: 32}}
train: {{global_batch: 4, micro_batch: 2, steps: 2, lr: 1.0e-3, checkpoint_every: 2}}
",
            pre.display(),
            corpus.corpus.display(),
            corpus.tokenizer.display()
        ),
    )
    .unwrap();
    let o = Command::new("mpirun")
        .args(["-np", "2", env!("CARGO_BIN_EXE_deberta-worker"), "train"])
        .arg(&pre_cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let ckpt = pre.join("checkpoints/step-00000002");
    let (cfg, out) = config(dir.path(), "from-tp2", 1, ", max_steps: 1", "");
    let yaml = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "init: {preset: tiny, vocab_size: 1000}",
            &format!("init: {{checkpoint: {}}}", ckpt.display()),
        )
        .replace(
            &tokenizer().display().to_string(),
            &corpus.tokenizer.display().to_string(),
        )
        .replace("lr: 1.0e-3", "lr: 1.0e-12");
    std::fs::write(&cfg, yaml).unwrap();
    let o = finetune(1, &cfg);
    assert!(o.status.success(), "{}", text(&o));
    let saved = tch::Tensor::read_safetensors(out.join("best/step-00000001/tp-00.safetensors")).unwrap();
    let shards: Vec<Vec<(String, tch::Tensor)>> = (0..2)
        .map(|k| tch::Tensor::read_safetensors(ckpt.join(format!("tp-{k:02}.safetensors"))).unwrap())
        .collect();
    let get = |f: &[(String, tch::Tensor)], n: &str| f.iter().find(|(m, _)| m == n).unwrap().1.shallow_clone();
    for name in [
        "deberta.embeddings.word_embeddings.weight",
        "deberta.encoder.layer.0.attention.self.query_proj.weight",
        "deberta.encoder.layer.1.attention.output.dense.weight",
        "deberta.encoder.layer.1.output.LayerNorm.weight",
    ] {
        let full = concat_shards(name, &[get(&shards[0], name), get(&shards[1], name)], 1000);
        let ours = get(&saved, name);
        let ours = ours.narrow(0, 0, full.size()[0]);
        let diff = (&ours - &full).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{name}: {diff}");
    }
}
