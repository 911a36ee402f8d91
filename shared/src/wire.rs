//! Wire types: what crosses a process boundary as JSON. Only these are serialized.

use serde::{Deserialize, Serialize};

use crate::intent::Route;

/// Bulk tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Classify,
    Generate,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Classify => "classify",
            Task::Generate => "generate",
        }
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "classify" => Ok(Task::Classify),
            "generate" => Ok(Task::Generate),
            _ => Err(format!("unknown task {s:?}: expected classify or generate")),
        }
    }
}

/// One line of a bulk input file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct InputItem {
    pub custom_id: String,
    pub input: String,
}

/// `classify` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifyOutput {
    pub intent: String,
    pub confidence: f32,
    pub route: Route,
}

/// `generate` output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerateOutput {
    pub text: String,
    pub tokens: u32,
}

/// A per-item error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemError {
    pub code: String,
    pub message: String,
}

/// One line of a bulk output file: exactly one per input item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OutputLine {
    Ok {
        custom_id: String,
        output: serde_json::Value,
    },
    Err {
        custom_id: String,
        error: ItemError,
    },
}

impl OutputLine {
    pub fn custom_id(&self) -> &str {
        match self {
            OutputLine::Ok { custom_id, .. } | OutputLine::Err { custom_id, .. } => custom_id,
        }
    }

    pub fn error(custom_id: impl Into<String>, code: &str, message: impl Into<String>) -> Self {
        OutputLine::Err {
            custom_id: custom_id.into(),
            error: ItemError {
                code: code.to_owned(),
                message: message.into(),
            },
        }
    }
}

/// Largest accepted `input` text of a bulk item, in characters.
pub const MAX_ITEM_CHARS: usize = 32_000;

/// Largest accepted `custom_id`, in characters (the edge's limit for inline items too).
pub const MAX_CUSTOM_ID_CHARS: usize = 256;

/// Longest input line read, in bytes (without its `\n`). Every item within the limits above
/// fits several times over, even with each character written as a JSON escape; a longer line
/// (a file without line breaks, an item padded with megabytes of whitespace) becomes a
/// [`line_too_long`] error line and is skipped without being held in memory.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// The error line of input line `line_no`, longer than [`MAX_LINE_BYTES`].
pub fn line_too_long(line_no: u64) -> OutputLine {
    OutputLine::error(
        line_no.to_string(),
        "line_too_long",
        format!(
            "line {line_no} is longer than {MAX_LINE_BYTES} bytes; expected one item per line, {{\"custom_id\": string, \"input\": string}}"
        ),
    )
}

/// Whether `id` is a usable `custom_id`: 1 to [`MAX_CUSTOM_ID_CHARS`] characters.
fn usable_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 4 * MAX_CUSTOM_ID_CHARS
        && id.chars().count() <= MAX_CUSTOM_ID_CHARS
}

/// The byte-order mark that some Windows tools (Notepad, Excel's "CSV UTF-8", PowerShell 5)
/// write at the start of a UTF-8 file.
pub const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Line `line_no` (1-based) of a text file without the [`UTF8_BOM`] that may open line 1; on
/// any other line the mark is a character like any other.
fn without_bom(line: &str, line_no: u64) -> &str {
    match line_no {
        1 => line.strip_prefix('\u{feff}').unwrap_or(line),
        _ => line,
    }
}

/// Line `line_no` (1-based) of a text file as read, with or without its line ending, as
/// text: without the `\n` or `\r\n` that ends it and, on line 1, without a [`UTF8_BOM`]; the
/// error says where the bytes stop being UTF-8 (see [`not_utf8`]).
pub fn line_text(line: &[u8], line_no: u64) -> Result<&str, std::str::Utf8Error> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    std::str::from_utf8(line).map(|s| without_bom(s, line_no))
}

/// Why a file that starts with `head` (its first bytes; two suffice) cannot be JSONL in UTF-8,
/// when it plainly cannot: UTF-16 text (Notepad's "Unicode") or a gzip file. Every line of
/// such a file would be an error line.
pub fn unusable_encoding(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"\xFF\xFE") || head.starts_with(b"\xFE\xFF") {
        Some("is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    } else if head.starts_with(b"\x1F\x8B") {
        Some("is gzip-compressed; decompress it first")
    } else {
        None
    }
}

/// [`parse_input_line`] for a line as read from a file: bytes, with or without its `\n` or
/// `\r\n`. A [`UTF8_BOM`] at the start of line 1 is not part of the item ([`line_text`]). A
/// line that is not UTF-8 (text saved as EUC-KR or CP949, say) becomes an error line as well,
/// under its own `custom_id` when that part of the line reads as UTF-8.
pub fn parse_input_bytes(line: &[u8], line_no: u64) -> Result<InputItem, OutputLine> {
    match line_text(line, line_no) {
        Ok(s) => parse_input_line(s, line_no),
        Err(e) => {
            let lossy = String::from_utf8_lossy(line);
            let id = readable_id(without_bom(&lossy, line_no))
                .filter(|id| !id.contains(char::REPLACEMENT_CHARACTER))
                .unwrap_or_else(|| line_no.to_string());
            Err(OutputLine::error(
                id,
                "invalid_item",
                not_utf8(&format!("line {line_no}"), &e),
            ))
        }
    }
}

/// Says that `what` is not UTF-8, where it stops being so, and what to do.
pub fn not_utf8(what: &str, e: &std::str::Utf8Error) -> String {
    format!(
        "{what} is not UTF-8 (byte {}); save it as UTF-8 (EUC-KR and CP949 are not accepted)",
        e.valid_up_to()
    )
}

/// The usable `custom_id` of a line that is a JSON object but not a valid item, if it has one.
fn readable_id(line: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("custom_id")?
        .as_str()
        .filter(|id| usable_id(id))
        .map(str::to_owned)
}

/// The error line of the item on line `line_no` whose `custom_id` an earlier line of the file
/// used.
pub fn duplicate_id_line(item: InputItem, line_no: u64) -> OutputLine {
    OutputLine::error(
        item.custom_id,
        "duplicate_custom_id",
        format!("line {line_no}: custom_id already used earlier in the file"),
    )
}

/// Parses one input line. `line_no` is 1-based; a line whose `custom_id` cannot be read gets
/// its line number as `custom_id` in the error.
pub fn parse_input_line(line: &str, line_no: u64) -> Result<InputItem, OutputLine> {
    // serde reads an array as a struct's fields in order: `["a", "hi"]` would pass as an item.
    let parsed = if line.trim_start().starts_with('[') {
        Err("invalid type: array, expected a JSON object".to_owned())
    } else {
        serde_json::from_str::<InputItem>(line).map_err(|e| json_problem(&e))
    };
    match parsed {
        Ok(item) if item.custom_id.is_empty() => Err(OutputLine::error(
            line_no.to_string(),
            "invalid_item",
            format!("line {line_no}: custom_id must not be empty"),
        )),
        Ok(item) if !usable_id(&item.custom_id) => Err(OutputLine::error(
            line_no.to_string(),
            "invalid_custom_id",
            format!(
                "line {line_no}: custom_id has {} characters; it must have 1..={MAX_CUSTOM_ID_CHARS}",
                item.custom_id.chars().count()
            ),
        )),
        Ok(item) if item.input.chars().count() > MAX_ITEM_CHARS => Err(OutputLine::error(
            item.custom_id,
            "input_too_long",
            format!(
                "line {line_no}: input has more than {MAX_ITEM_CHARS} characters; split it into smaller items"
            ),
        )),
        Ok(item) => Ok(item),
        Err(problem) => {
            let id = readable_id(line).unwrap_or_else(|| line_no.to_string());
            Err(OutputLine::error(
                id,
                "invalid_item",
                format!(
                    "line {line_no}: {problem}; expected {{\"custom_id\": string, \"input\": string}}"
                ),
            ))
        }
    }
}

/// What serde_json found wrong with a line, its position given as a column: the line number
/// it reports is always 1, since it reads the line alone.
fn json_problem(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&position) {
        Some(problem) if e.line() > 0 => format!("{problem} (column {})", e.column()),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn good_line_parses() {
        let item = parse_input_line(r#"{"custom_id":"a","input":"안녕"}"#, 1).expect("valid");
        assert_eq!(
            item,
            InputItem {
                custom_id: "a".into(),
                input: "안녕".into()
            }
        );
    }

    #[test]
    fn utf16_and_gzip_files_are_named() {
        let utf16le = "{\"custom_id\"".encode_utf16().flat_map(u16::to_le_bytes);
        let head: Vec<u8> = [0xFF, 0xFE].into_iter().chain(utf16le).collect();
        assert!(unusable_encoding(&head).is_some_and(|w| w.contains("UTF-16")));
        assert!(unusable_encoding(b"\xFE\xFF\x00{").is_some_and(|w| w.contains("UTF-16")));
        assert!(unusable_encoding(b"\x1F\x8B\x08\x00").is_some_and(|w| w.contains("gzip")));
        for fine in [&b"{\"custom_id\""[..], b"\xEF\xBB\xBF{", b"", b"\xFF"] {
            assert_eq!(unusable_encoding(fine), None, "{fine:?}");
        }
    }

    #[test]
    fn a_line_as_text_loses_its_ending_and_line_1_its_byte_order_mark() {
        assert_eq!(
            line_text(b"\xEF\xBB\xBF\xEC\x95\x88\xEB\x85\x95\r\n", 1),
            Ok("안녕")
        );
        assert_eq!(line_text(b"hi\n", 2), Ok("hi"));
        assert_eq!(line_text(b"hi", 2), Ok("hi"));
        // Only the last line ending goes; a mark after line 1 is text.
        assert_eq!(line_text(b"hi\n\n", 2), Ok("hi\n"));
        assert_eq!(line_text("\u{feff}hi".as_bytes(), 2), Ok("\u{feff}hi"));
        // "안" in CP949 (0xBE 0xC8) after two valid bytes.
        let e = line_text(b"ok\xBE\xC8\n", 3).expect_err("not UTF-8");
        assert_eq!(e.valid_up_to(), 2);
    }

    #[test]
    fn a_byte_order_mark_opens_line_1_only() {
        let line = "\u{feff}{\"custom_id\":\"a\",\"input\":\"안녕\"}\r\n";
        let item = parse_input_bytes(line.as_bytes(), 1).expect("valid");
        assert_eq!(
            (item.custom_id.as_str(), item.input.as_str()),
            ("a", "안녕")
        );
        // Anywhere else it is a stray character, and the line is malformed.
        let err = parse_input_bytes(line.as_bytes(), 2).expect_err("invalid");
        assert_eq!(err.custom_id(), "2");
    }

    #[test]
    fn malformed_line_becomes_an_error_line_with_its_line_number() {
        let err = parse_input_line("{not json", 7).expect_err("invalid");
        assert_eq!(err.custom_id(), "7");
        let json = serde_json::to_value(&err).expect("serializes");
        assert_eq!(json["error"]["code"], "invalid_item");
    }

    #[test]
    fn every_line_error_names_its_line_once() {
        let message = |line: &str| {
            let err = parse_input_line(line, 12).expect_err("invalid");
            let json = serde_json::to_value(&err).expect("serializes");
            json["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let wrong_type = message(r#"{"custom_id":"x","input":7}"#);
        assert!(
            wrong_type
                .starts_with("line 12: invalid type: integer `7`, expected a string (column 26)"),
            "{wrong_type}"
        );
        // A line that is JSON but no object says what it should be, not a Rust type name.
        let string = message(r#""hi""#);
        assert!(
            string.starts_with(r#"line 12: invalid type: string "hi", expected a JSON object"#),
            "{string}"
        );
        // An array is no item either, even one whose values would fill its fields in order.
        for line in [r#"["a", "hi"]"#, " [7]", "[]"] {
            let err = parse_input_line(line, 12).expect_err(line);
            assert_eq!(err.custom_id(), "12", "{line}");
            let m = message(line);
            assert!(
                m.starts_with("line 12: invalid type: array, expected a JSON object"),
                "{m}"
            );
        }
        for line in [
            "{not json",
            r#"{"custom_id":"","input":"hi"}"#,
            &format!(
                r#"{{"custom_id":"x","input":"{}"}}"#,
                "a".repeat(MAX_ITEM_CHARS + 1)
            ),
        ] {
            let m = message(line);
            assert!(m.starts_with("line 12: "), "{m}");
            assert!(!m.contains("line 1 "), "{m}");
        }
    }

    /// A CP949 input ("안녕" is B0 C8 B3 E7 there) cannot be read, but its item keeps its
    /// `custom_id`, and the message says where the line stops being UTF-8 and what to do.
    #[test]
    fn a_line_that_is_not_utf8_keeps_its_readable_custom_id() {
        let cp949 = b"{\"custom_id\":\"q-7\",\"input\":\"\xB0\xC8\xB3\xE7\"}\n";
        let err = parse_input_bytes(cp949, 4).expect_err("not UTF-8");
        assert_eq!(err.custom_id(), "q-7");
        let json = serde_json::to_value(&err).expect("serializes");
        assert_eq!(json["error"]["code"], "invalid_item");
        assert_eq!(
            json["error"]["message"],
            "line 4 is not UTF-8 (byte 28); save it as UTF-8 (EUC-KR and CP949 are not accepted)"
        );
        // Also on line 1 after a byte-order mark.
        let with_bom = [UTF8_BOM, &cp949[..]].concat();
        assert_eq!(
            parse_input_bytes(&with_bom, 1).expect_err("").custom_id(),
            "q-7"
        );
        // A custom_id that is itself not UTF-8, or a line that is no object, gives the line
        // number.
        for line in [
            &b"{\"custom_id\":\"\xB0\xC8\",\"input\":\"hi\"}"[..],
            b"\xB0\xC8 hello",
            b"{\"input\":\"\xB0\xC8\"}",
        ] {
            assert_eq!(
                parse_input_bytes(line, 9).expect_err("").custom_id(),
                "9",
                "{line:?}"
            );
        }
    }

    #[test]
    fn wrong_type_keeps_the_readable_custom_id() {
        let err = parse_input_line(r#"{"custom_id":"x9","input":5}"#, 3).expect_err("invalid");
        assert_eq!(err.custom_id(), "x9");
    }

    #[test]
    fn a_custom_id_over_the_limit_is_replaced_by_the_line_number() {
        let id = |n: usize| "가".repeat(n);
        let line = |id: &str, input: &str| format!(r#"{{"custom_id":"{id}","input":{input}}}"#);
        let ok = parse_input_line(&line(&id(MAX_CUSTOM_ID_CHARS), "\"hi\""), 4).expect("valid");
        assert_eq!(ok.custom_id.chars().count(), MAX_CUSTOM_ID_CHARS);
        let err = parse_input_line(&line(&id(MAX_CUSTOM_ID_CHARS + 1), "\"hi\""), 5)
            .expect_err("too long");
        assert_eq!(err.custom_id(), "5");
        let json = serde_json::to_value(&err).expect("serializes");
        assert_eq!(json["error"]["code"], "invalid_custom_id");
        // A malformed line does not lend its overlong id to the error line either.
        let err = parse_input_line(&line(&id(MAX_CUSTOM_ID_CHARS + 1), "5"), 6).expect_err("bad");
        assert_eq!(err.custom_id(), "6");
        let json = serde_json::to_value(line_too_long(9)).expect("serializes");
        assert_eq!(json["custom_id"], "9");
        assert_eq!(json["error"]["code"], "line_too_long");
    }

    #[test]
    fn output_lines_have_the_contract_shape() {
        let ok = OutputLine::Ok {
            custom_id: "a".into(),
            output: serde_json::json!({"text": "hi", "tokens": 1}),
        };
        assert_eq!(
            serde_json::to_string(&ok).expect("json"),
            r#"{"custom_id":"a","output":{"text":"hi","tokens":1}}"#
        );
        let back: OutputLine =
            serde_json::from_str(r#"{"custom_id":"b","error":{"code":"c","message":"m"}}"#)
                .expect("parses");
        assert_eq!(back, OutputLine::error("b", "c", "m"));
    }

    proptest! {
        #[test]
        fn any_line_gives_an_item_or_an_error_line(line in "\\PC{0,200}", n in 1u64..1000) {
            match parse_input_line(&line, n) {
                Ok(item) => prop_assert!(!item.custom_id.is_empty()),
                Err(e) => prop_assert!(!e.custom_id().is_empty()),
            }
        }

        #[test]
        fn input_items_round_trip(id in "\\PC{1,40}", input in "\\PC{0,200}") {
            let item = InputItem { custom_id: id, input };
            let line = serde_json::to_string(&item).expect("json");
            prop_assert_eq!(parse_input_line(&line, 1).expect("valid"), item);
        }
    }
}
