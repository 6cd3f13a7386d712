//! Pipeline mode: JSON lines on stdin (`task` optional, default the first task), one JSON
//! result or error record per line on stdout, in input order.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::time::Instant;

use serde_json::Value;

use crate::classify::input;
use crate::serve::message::error_record;
use crate::serve::worker::{self, Done, Job, Output, Work, WorkerHandle};
use crate::serve::{ServeConfig, ServeError};
use crate::util::jsonl::JsonLines;

/// Outcomes by line number (None: still in work), written out in line order as soon as
/// the oldest is in.
struct InOrder {
    pending: BTreeMap<u64, Option<Value>>,
    next_out: u64,
}

impl InOrder {
    fn write_ready(&mut self, out: &mut dyn Write) -> Result<(), ServeError> {
        while let Some(Some(v)) = self.pending.get(&self.next_out) {
            writeln!(out, "{v}").map_err(ServeError::Output)?;
            self.pending.remove(&self.next_out);
            self.next_out += 1;
        }
        out.flush().map_err(ServeError::Output)
    }

    fn waiting(&self) -> bool {
        self.pending.values().any(Option::is_none)
    }
}

/// Runs every line of `input` through the served tasks, writing results to `out`.
pub fn run_stdio(
    cfg: ServeConfig,
    input: impl BufRead,
    mut out: impl Write,
) -> Result<(), ServeError> {
    let (tx, rx) = std::sync::mpsc::channel::<Done>();
    let mut worker = worker::spawn(
        cfg.engine.clone(),
        cfg.tasks.clone(),
        cfg.worker_options(),
        move |d| {
            let _ = tx.send(d);
        },
    )?;
    let mut order = InOrder {
        pending: BTreeMap::new(),
        next_out: 1,
    };
    // Requests are numbered among the non-blank lines (their tickets, and the line in
    // an error record).
    let mut line_no = 0u64;
    let mut lines = JsonLines::new(input);
    while let Some((_, bytes)) = lines.next_line().map_err(ServeError::Stdin)? {
        line_no += 1;
        let record = match input::parse_line_value(bytes, line_no as usize) {
            Ok(None) => {
                line_no -= 1;
                continue;
            }
            Err(e) => Some(error_record(None, None, None, e.kind(), &e.to_string())),
            Ok(Some(value)) => submit(&worker, value, line_no)?,
        };
        order.pending.insert(line_no, record);
        while let Ok(d) = rx.try_recv() {
            order.pending.insert(d.ticket, Some(done_value(&worker, d)));
        }
        order.write_ready(&mut out)?;
    }
    worker.close();
    while order.waiting() {
        match rx.recv() {
            Ok(d) => {
                order.pending.insert(d.ticket, Some(done_value(&worker, d)));
            }
            Err(_) => break,
        }
    }
    order.write_ready(&mut out)?;
    worker.join();
    Ok(())
}

/// Queues one pipeline line (`task` picks the task, default the first); an error record
/// when the line is not a request for it.
fn submit(
    worker: &WorkerHandle,
    mut value: Value,
    line_no: u64,
) -> Result<Option<Value>, ServeError> {
    let task_name = match value.as_object_mut().and_then(|o| o.remove("task")) {
        None => worker.task_names[0].clone(),
        Some(Value::String(s)) => s,
        Some(_) => {
            return Ok(Some(error_record(
                None,
                None,
                None,
                "invalid_request",
                &format!("line {line_no}: field `task` must be a string"),
            )))
        }
    };
    let Some(task) = worker.task_index(&task_name) else {
        return Ok(Some(error_record(
            value.get("id").and_then(Value::as_str),
            Some(&task_name),
            None,
            "unknown_task",
            &format!("unknown task `{task_name}`"),
        )));
    };
    let job = match Job::from_json(worker.task_kinds[task], value, &line_no.to_string()) {
        Ok(j) => j,
        Err(reason) => {
            return Ok(Some(error_record(
                None,
                Some(&task_name),
                None,
                "invalid_request",
                &format!("line {line_no}: {reason}"),
            )))
        }
    };
    let work = Work {
        task,
        job,
        ticket: line_no,
        received: Instant::now(),
    };
    worker.submit(work).map_err(|_| ServeError::WorkerStopped)?;
    Ok(None)
}

/// The line written for an outcome: the result itself, or an error record.
fn done_value(worker: &WorkerHandle, d: Done) -> Value {
    match d.outcome {
        Ok(Output::Classified(r)) => serde_json::to_value(r.as_ref()).unwrap_or(Value::Null),
        Ok(Output::Ranked(r)) => serde_json::to_value(&r).unwrap_or(Value::Null),
        Ok(Output::Reacted(r)) => serde_json::to_value(r.as_ref()).unwrap_or(Value::Null),
        Err(e) => error_record(
            Some(&d.request_id),
            worker.task_names.get(d.task).map(String::as_str),
            None,
            e.kind(),
            &e.to_string(),
        ),
    }
}
