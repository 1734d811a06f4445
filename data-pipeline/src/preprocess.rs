//! `deberta preprocess`: text or jsonl files -> token shards + manifest (formats in `format`).
//!
//! Three stages run concurrently: a reader thread streams the inputs line by line (the corpus is
//! never held in memory) and cuts them into documents; the calling thread tokenises batches of
//! documents on a rayon pool of `workers` threads; the writer appends them, in input order, to
//! the current shard. Everything is written under temporary names and renamed at the end, the
//! manifest last, so an interrupted or failed run leaves nothing that looks complete.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::format::{
    encode_idx, manifest_path, shard_names, Manifest, ShardRecord, TokenizerRecord, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use crate::tokenizer::{sha256_hex, Vocab};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputFormat {
    /// Plain text; documents are separated by blank lines, a document's lines joined by spaces.
    Text,
    /// One JSON object per line; the document is the string in `field`.
    Jsonl { field: String },
}

#[derive(Debug, Clone)]
pub struct PreprocessOptions {
    pub tokenizer: PathBuf,
    pub inputs: Vec<PathBuf>,
    pub output_prefix: PathBuf,
    pub format: InputFormat,
    /// A shard is closed at the first document boundary at or after this many tokens.
    pub shard_tokens: u64,
    /// Tokenizer threads.
    pub workers: usize,
    /// Show a progress bar (bytes read, MB/s, ETA) on stderr.
    pub progress: bool,
}

#[derive(Debug, Clone)]
pub struct PreprocessSummary {
    pub manifest: PathBuf,
    pub documents: u64,
    pub tokens: u64,
    pub shards: usize,
    pub input_bytes: u64,
    pub seconds: f64,
}

/// Documents per tokenisation batch, and the byte size that also closes a batch.
const BATCH_DOCS: usize = 512;
const BATCH_BYTES: usize = 4 << 20;

struct Batch {
    docs: Vec<String>,
    bytes: u64,
}

/// Read one line as UTF-8 without its line ending; Ok(None) at end of file.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>, path: &Path, lineno: u64) -> Result<Option<String>> {
    buf.clear();
    let n = reader
        .read_until(b'\n', buf)
        .map_err(|e| DataError::line(path, lineno, format!("cannot read: {e}")))?;
    if n == 0 {
        return Ok(None);
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    let line = std::str::from_utf8(buf).map_err(|e| {
        DataError::line(
            path,
            lineno,
            format!("not valid UTF-8 (byte {} of the line)", e.valid_up_to() + 1),
        )
    })?;
    Ok(Some(line.to_string()))
}

/// The reader stage: emits documents in batches, or the first error.
fn read_documents(inputs: Vec<PathBuf>, format: InputFormat, tx: std::sync::mpsc::SyncSender<Result<Batch>>) {
    let mut batch = Batch {
        docs: Vec::with_capacity(BATCH_DOCS),
        bytes: 0,
    };
    let mut batch_len = 0usize;
    let send = |batch: &mut Batch, batch_len: &mut usize| -> bool {
        let full = std::mem::replace(
            batch,
            Batch {
                docs: Vec::with_capacity(BATCH_DOCS),
                bytes: 0,
            },
        );
        *batch_len = 0;
        tx.send(Ok(full)).is_ok()
    };
    for path in inputs {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Err(DataError::input(&path, format!("cannot open: {e}"))));
                return;
            }
        };
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut buf = Vec::new();
        let mut doc = String::new();
        let mut lineno = 0u64;
        loop {
            lineno += 1;
            let line = match read_line(&mut reader, &mut buf, &path, lineno) {
                Ok(Some(l)) => l,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            batch.bytes += buf.len() as u64 + 1;
            let finished = match &format {
                InputFormat::Text => {
                    if line.trim().is_empty() {
                        (!doc.is_empty()).then(|| std::mem::take(&mut doc))
                    } else {
                        if !doc.is_empty() {
                            doc.push(' ');
                        }
                        doc.push_str(line.trim_end());
                        None
                    }
                }
                InputFormat::Jsonl { field } => {
                    if line.trim().is_empty() {
                        None
                    } else {
                        match jsonl_field(&line, field) {
                            Ok(text) => Some(text),
                            Err(msg) => {
                                let _ = tx.send(Err(DataError::line(&path, lineno, msg)));
                                return;
                            }
                        }
                    }
                }
            };
            if let Some(d) = finished {
                batch_len += d.len();
                batch.docs.push(d);
                if (batch.docs.len() >= BATCH_DOCS || batch_len >= BATCH_BYTES) && !send(&mut batch, &mut batch_len) {
                    return;
                }
            }
        }
        if !doc.is_empty() {
            batch_len += doc.len();
            batch.docs.push(doc);
        }
    }
    if !batch.docs.is_empty() || batch.bytes > 0 {
        send(&mut batch, &mut batch_len);
    }
}

fn jsonl_field(line: &str, field: &str) -> std::result::Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    match v.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("field {field:?} is not a string (found {})", kind_of(other))),
        None => Err(format!("no field {field:?} in this JSON line")),
    }
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The shard being written, under temporary names.
struct OpenShard {
    index: usize,
    bin_tmp: PathBuf,
    bin: BufWriter<File>,
    hasher: Sha256,
    offsets: Vec<u64>,
}

struct Writer {
    dir: PathBuf,
    prefix: PathBuf,
    shard_tokens: u64,
    suffix: String,
    current: Option<OpenShard>,
    /// (record, bin tmp, idx tmp) of closed shards, renamed at the very end.
    closed: Vec<(ShardRecord, PathBuf, PathBuf)>,
}

impl Writer {
    fn tmp(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{}", self.suffix))
    }

    fn push(&mut self, ids: &[u32]) -> Result<()> {
        if self.current.is_none() {
            let index = self.closed.len();
            let (bin_name, _) = shard_names(&self.prefix, index);
            let bin_tmp = self.tmp(&bin_name);
            let f = File::create(&bin_tmp).map_err(|e| DataError::output(&bin_tmp, format!("cannot create: {e}")))?;
            self.current = Some(OpenShard {
                index,
                bin_tmp,
                bin: BufWriter::with_capacity(4 << 20, f),
                hasher: Sha256::new(),
                offsets: vec![0],
            });
        }
        let shard = self.current.as_mut().expect("opened above");
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for id in ids {
            bytes.extend_from_slice(&id.to_le_bytes());
        }
        shard
            .bin
            .write_all(&bytes)
            .map_err(|e| DataError::output(&shard.bin_tmp, format!("cannot write: {e}")))?;
        shard.hasher.update(&bytes);
        let end = shard.offsets.last().unwrap() + ids.len() as u64;
        shard.offsets.push(end);
        if end >= self.shard_tokens {
            self.close()?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        let Some(mut shard) = self.current.take() else {
            return Ok(());
        };
        shard
            .bin
            .flush()
            .map_err(|e| DataError::output(&shard.bin_tmp, format!("cannot write: {e}")))?;
        let (bin_name, idx_name) = shard_names(&self.prefix, shard.index);
        let idx_tmp = self.tmp(&idx_name);
        let idx = encode_idx(&shard.offsets);
        std::fs::write(&idx_tmp, &idx).map_err(|e| DataError::output(&idx_tmp, format!("cannot write: {e}")))?;
        let record = ShardRecord {
            bin: bin_name,
            idx: idx_name,
            documents: shard.offsets.len() as u64 - 1,
            tokens: *shard.offsets.last().unwrap(),
            bin_sha256: shard.hasher.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            idx_sha256: sha256_hex(&idx),
        };
        self.closed.push((record, shard.bin_tmp, idx_tmp));
        Ok(())
    }

    /// Remove every temporary file (on failure).
    fn abandon(&mut self) {
        if let Some(s) = self.current.take() {
            drop(s.bin);
            let _ = std::fs::remove_file(&s.bin_tmp);
        }
        for (_, b, i) in self.closed.drain(..) {
            let _ = std::fs::remove_file(b);
            let _ = std::fs::remove_file(i);
        }
    }
}

pub fn preprocess(opts: &PreprocessOptions) -> Result<PreprocessSummary> {
    let start = Instant::now();
    if opts.inputs.is_empty() {
        return Err(DataError::Config("no input files".into()));
    }
    if opts.shard_tokens == 0 {
        return Err(DataError::Config("--shard-tokens must be positive".into()));
    }
    let vocab = Vocab::load(&opts.tokenizer)?;
    let mut total_bytes = 0u64;
    for p in &opts.inputs {
        let m = std::fs::metadata(p).map_err(|e| DataError::input(p, format!("cannot read: {e}")))?;
        total_bytes += m.len();
    }
    let file_name = opts.output_prefix.file_name().ok_or_else(|| {
        DataError::Config(format!(
            "--output-prefix {} has no file name part",
            opts.output_prefix.display()
        ))
    })?;
    let dir = match opts.output_prefix.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| DataError::output(&dir, format!("cannot create directory: {e}")))?;
    let prefix = dir.join(file_name);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.workers.max(1))
        .build()
        .map_err(|e| DataError::Config(format!("--workers: {e}")))?;

    let (tx, rx) = sync_channel::<Result<Batch>>(4);
    let (inputs, format) = (opts.inputs.clone(), opts.format.clone());
    let reader = std::thread::spawn(move || read_documents(inputs, format, tx));

    let bar = if opts.progress {
        let bar = indicatif::ProgressBar::new(total_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "preprocess [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .expect("valid template"),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut writer = Writer {
        dir: dir.clone(),
        prefix: prefix.clone(),
        shard_tokens: opts.shard_tokens,
        suffix: format!(".tmp-{}", std::process::id()),
        current: None,
        closed: Vec::new(),
    };
    let result = write_all(&rx, &pool, &vocab, &mut writer, &bar);
    drop(rx); // unblocks the reader if we stopped early
    let _ = reader.join();
    bar.finish_and_clear();
    let (documents, tokens) = match result {
        Ok(counts) => counts,
        Err(e) => {
            writer.abandon();
            return Err(e);
        }
    };
    if documents == 0 {
        writer.abandon();
        let names: Vec<String> = opts.inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(DataError::input(
            Path::new(&names.join(", ")),
            "no documents with any token (empty input?)",
        ));
    }
    if let Err(e) = writer.close() {
        writer.abandon();
        return Err(e);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        tokenizer: TokenizerRecord {
            path: opts.tokenizer.display().to_string(),
            sha256: vocab.sha256.clone(),
            vocab_size: vocab.vocab_size,
        },
        documents,
        tokens,
        shards: writer.closed.iter().map(|(r, _, _)| r.clone()).collect(),
        inputs: opts.inputs.iter().map(|p| p.display().to_string()).collect(),
    };
    for (record, bin_tmp, idx_tmp) in &writer.closed {
        for (tmp, name) in [(bin_tmp, &record.bin), (idx_tmp, &record.idx)] {
            let dest = dir.join(name);
            std::fs::rename(tmp, &dest).map_err(|e| DataError::output(&dest, format!("cannot rename: {e}")))?;
        }
    }
    let manifest_file = manifest_path(&prefix);
    let tmp = dir.join(format!(
        "{}{}",
        manifest_file.file_name().unwrap().to_string_lossy(),
        writer.suffix
    ));
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serialises") + "\n";
    std::fs::write(&tmp, json).map_err(|e| DataError::output(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, &manifest_file)
        .map_err(|e| DataError::output(&manifest_file, format!("cannot rename: {e}")))?;
    Ok(PreprocessSummary {
        manifest: manifest_file,
        documents,
        tokens,
        shards: manifest.shards.len(),
        input_bytes: total_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Tokenise and write every batch; returns (documents, tokens).
fn write_all(
    rx: &Receiver<Result<Batch>>,
    pool: &rayon::ThreadPool,
    vocab: &Vocab,
    writer: &mut Writer,
    bar: &indicatif::ProgressBar,
) -> Result<(u64, u64)> {
    let (mut documents, mut tokens) = (0u64, 0u64);
    for batch in rx {
        let batch = batch?;
        let encoded = pool.install(|| vocab.encode_batch(batch.docs))?;
        for ids in encoded.iter().filter(|ids| !ids.is_empty()) {
            writer.push(ids)?;
            documents += 1;
            tokens += ids.len() as u64;
        }
        bar.inc(batch.bytes);
        bar.set_message(format!("{documents} docs, {tokens} tokens"));
    }
    Ok((documents, tokens))
}
