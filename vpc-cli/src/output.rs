//! How the API commands print a result: `-o table|wide|json|yaml` and `--query`.
//!
//! Every result has one JSON value (what `-o json` prints: the response message, proto3 JSON
//! names) and a text form (an aligned table, `describe` blocks, a line). `-o json` and `-o
//! yaml` print the value, `-o table` and `-o wide` the text form (`wide` with more columns).
//! `--query EXPR` applies a JMESPath expression to the value first, as the aws CLI does; its
//! result is printed as JSON, as YAML with `-o yaml`, or as text with `-o table|wide` (see
//! [`query_text`]).
//!
//! With no `-o` (flag, `VPC_OUTPUT` or config), stdout decides: a terminal gets tables,
//! anything else (a pipe, a file) JSON, which is stable and machine-readable.

use std::io::Write as _;

use serde_json::Value;

use crate::api::Output;

/// The output when nothing chose one: tables on a terminal, JSON otherwise.
pub fn default_output(stdout_is_terminal: bool) -> Output {
    if stdout_is_terminal {
        Output::Table
    } else {
        Output::Json
    }
}

/// Checks a `--query` expression (before any request is made).
pub fn check_query(expr: &str) -> Result<(), String> {
    jmespath::compile(expr)
        .map(drop)
        .map_err(|e| query_error(expr, &e))
}

/// `--query EXPR`: `v` filtered by the JMESPath expression.
pub fn apply_query(expr: &str, v: &Value) -> Result<Value, String> {
    let compiled = jmespath::compile(expr).map_err(|e| query_error(expr, &e))?;
    let found = compiled.search(v).map_err(|e| query_error(expr, &e))?;
    serde_json::to_value(&*found).map_err(|e| format!("--query `{expr}`: {e}"))
}

/// One line: the reason and where (jmespath's own text spans three lines).
fn query_error(expr: &str, e: &jmespath::JmespathError) -> String {
    format!(
        "--query `{expr}`: {} (at column {})",
        e.reason,
        e.column + 1
    )
}

/// `v` as pretty JSON, with a final newline.
pub fn json_text(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s
}

/// `v` as YAML (the same value as [`json_text`]: it parses back to it).
pub fn yaml_text(v: &Value) -> String {
    let s = serde_yaml::to_string(v).unwrap_or_else(|e| format!("# not YAML: {e}\n"));
    if s.ends_with('\n') { s } else { s + "\n" }
}

/// A `--query` result as text (`-o table|wide`): a scalar on its line (strings unquoted, null
/// prints nothing), a list of scalars one per line, a list of lists of scalars one row per
/// line (tab-separated, as the aws CLI's text output), anything else as JSON.
pub fn query_text(v: &Value) -> String {
    fn scalar(v: &Value) -> Option<String> {
        match v {
            Value::Null => Some(String::new()),
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    fn row(v: &Value) -> Option<String> {
        match v {
            Value::Array(a) => a
                .iter()
                .map(scalar)
                .collect::<Option<Vec<_>>>()
                .map(|cells| cells.join("\t")),
            other => scalar(other),
        }
    }
    match v {
        Value::Null => String::new(),
        Value::Array(a) => match a.iter().map(row).collect::<Option<Vec<_>>>() {
            Some(lines) => lines.into_iter().map(|l| l + "\n").collect(),
            None => json_text(v),
        },
        other => match scalar(other) {
            Some(s) => s + "\n",
            None => json_text(other),
        },
    }
}

/// What a result prints as: its data (JSON/YAML/query text), or `None` when the caller
/// prints its text form. Errors are `--query` errors.
pub fn render(
    output: Output,
    query: Option<&str>,
    value: &Value,
) -> Result<Option<String>, String> {
    let v;
    let shown = match query {
        Some(q) => {
            v = apply_query(q, value)?;
            &v
        }
        None if matches!(output, Output::Table | Output::Wide) => return Ok(None),
        None => value,
    };
    Ok(Some(match output {
        Output::Json => json_text(shown),
        Output::Yaml => yaml_text(shown),
        Output::Table | Output::Wide => query_text(shown),
    }))
}

/// Prints a result: `value` (what `-o json` prints) as the output and `--query` ask, or its
/// text form: `text(wide)` prints it. A `--query` that fails on the value (a type error in a
/// function) is a usage error: exit 2.
pub fn emit(
    output: Output,
    query: Option<&str>,
    value: impl FnOnce() -> Value,
    text: impl FnOnce(bool),
) {
    if query.is_none() && matches!(output, Output::Table | Output::Wide) {
        return text(output == Output::Wide);
    }
    match render(output, query, &value()) {
        Ok(Some(s)) => write_stdout(s.as_bytes()),
        Ok(None) => text(output == Output::Wide),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2)
        }
    }
}

/// Writes to stdout; a closed pipe (`vpc ... | head`) ends the program quietly, another
/// error with a message (exit 1), never a panic.
pub fn write_stdout(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing the output: {e}");
        std::process::exit(1);
    }
}

/// Milliseconds since the epoch as UTC RFC 3339 (`2024-05-01T12:00:00Z`); 0 is empty.
pub fn time_text(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({"instances": [
            {"instanceId": "i-1", "privateIpAddress": "10.0.1.4", "state": "running",
             "tags": [{"key": "Name", "value": "web"}], "vcpus": 2},
            {"instanceId": "i-2", "privateIpAddress": "10.0.1.5", "state": "stopped",
             "tags": [], "vcpus": 1},
        ]})
    }

    #[test]
    fn default_output_follows_the_terminal() {
        assert_eq!(default_output(true), Output::Table);
        assert_eq!(default_output(false), Output::Json);
    }

    #[test]
    fn queries() {
        let v = sample();
        assert_eq!(
            apply_query("instances[].privateIpAddress", &v).unwrap(),
            json!(["10.0.1.4", "10.0.1.5"])
        );
        assert_eq!(
            apply_query("instances[?state=='running'].instanceId | [0]", &v).unwrap(),
            json!("i-1")
        );
        assert_eq!(apply_query("length(instances)", &v).unwrap(), json!(2));
        assert_eq!(apply_query("nothing", &v).unwrap(), Value::Null);
        assert_eq!(
            apply_query("instances[].{id: instanceId, cpus: vcpus}", &v).unwrap(),
            json!([{"id": "i-1", "cpus": 2}, {"id": "i-2", "cpus": 1}])
        );
        // Compile errors are found before any request; one line, with the column.
        let e = check_query("instances[").unwrap_err();
        assert!(e.starts_with("--query `instances[`: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(check_query("instances[].instanceId").is_ok());
        // A runtime (type) error.
        assert!(apply_query("length(`5`)", &v).is_err());
    }

    #[test]
    fn query_results_as_text() {
        assert_eq!(query_text(&json!("i-1")), "i-1\n");
        assert_eq!(query_text(&json!(3)), "3\n");
        assert_eq!(query_text(&Value::Null), "");
        assert_eq!(query_text(&json!(["a", "b", 1, true])), "a\nb\n1\ntrue\n");
        assert_eq!(
            query_text(&json!([["i-1", "10.0.1.4"], ["i-2", "10.0.1.5"]])),
            "i-1\t10.0.1.4\ni-2\t10.0.1.5\n"
        );
        assert_eq!(query_text(&json!({"a": 1})), "{\n  \"a\": 1\n}\n");
        assert_eq!(
            query_text(&json!([{"a": 1}])),
            json_text(&json!([{"a": 1}]))
        );
        assert_eq!(query_text(&json!([])), "");
    }

    #[test]
    fn yaml_is_the_json_value() {
        let v = json!({
            "vpc": {"vpcId": "vpc-1", "cidrBlock": "10.0.0.0/16", "vni": 7, "main": true,
                    "empty": "", "numeric": "123", "boolish": "true", "nullish": "null",
                    "dash": "-", "colon": "a: b", "tags": [], "hc": null, "f": 1.5,
                    "neg": -1, "multi": "line1\nline2"}
        });
        let y = yaml_text(&v);
        let back: Value = serde_yaml::from_str(&y).unwrap();
        assert_eq!(back, v, "{y}");
        assert!(y.contains("vpcId: vpc-1\n"), "{y}");
    }

    #[test]
    fn rendering_by_output_and_query() {
        let v = sample();
        assert_eq!(render(Output::Table, None, &v), Ok(None));
        assert_eq!(render(Output::Wide, None, &v), Ok(None));
        assert_eq!(render(Output::Json, None, &v), Ok(Some(json_text(&v))));
        assert_eq!(render(Output::Yaml, None, &v), Ok(Some(yaml_text(&v))));
        let q = Some("instances[].instanceId");
        assert_eq!(
            render(Output::Json, q, &v),
            Ok(Some("[\n  \"i-1\",\n  \"i-2\"\n]\n".into()))
        );
        assert_eq!(
            render(Output::Yaml, q, &v),
            Ok(Some("- i-1\n- i-2\n".into()))
        );
        assert_eq!(render(Output::Table, q, &v), Ok(Some("i-1\ni-2\n".into())));
        assert!(render(Output::Json, Some("]"), &v).is_err());
    }

    #[test]
    fn times() {
        assert_eq!(time_text(0), "");
        assert_eq!(time_text(1_000), "1970-01-01T00:00:01Z");
        assert_eq!(time_text(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(time_text(1_714_564_800_123), "2024-05-01T12:00:00Z");
        assert_eq!(time_text(4_102_444_799_000), "2099-12-31T23:59:59Z");
    }
}
