//! Text output for people: aligned tables, `key: value` blocks, times and durations.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Columns are separated by this many spaces.
const GAP: usize = 2;

/// Rows of cells under a header, printed with every column as wide as its widest cell.
#[derive(Debug)]
pub(super) struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column titles.
    pub(super) fn new(header: &[&'static str]) -> Self {
        Self {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing cells print empty, extra cells are dropped.
    pub(super) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as lines, each ending in a newline.
    pub(super) fn render(&self) -> String {
        let widths = self.widths();
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            push_line(&mut out, &widths, cells);
        }
        out
    }

    fn widths(&self) -> Vec<usize> {
        (0..self.header.len())
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(i))
                    .map(|cell| cell.chars().count())
                    .chain([self.header[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }
}

/// Appends one padded line; the last column is not padded so lines carry no trailing spaces.
fn push_line(out: &mut String, widths: &[usize], cells: &[String]) {
    let mut line = String::new();
    for (i, width) in widths.iter().enumerate() {
        let cell = cells.get(i).map(String::as_str).unwrap_or("");
        if i + 1 == widths.len() {
            line.push_str(cell);
        } else {
            line.push_str(cell);
            let pad = width - cell.chars().count() + GAP;
            line.extend(std::iter::repeat_n(' ', pad));
        }
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

/// A `key: value` block, values aligned; a field with several values puts each on its own line.
pub(super) fn fields(rows: &[(&str, Vec<String>)]) -> String {
    let width = rows
        .iter()
        .map(|(key, _)| key.chars().count() + 1)
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, values) in rows {
        let label = format!("{key}:");
        let mut values = values.iter();
        let first = values.next().map(String::as_str).unwrap_or("");
        out.push_str(format!("{label:<width$}  {first}").trim_end());
        out.push('\n');
        for value in values {
            out.push_str(&format!("{:width$}  {value}\n", ""));
        }
    }
    out
}

/// Unix seconds as a time; `None` for zero (never set) or a value RFC 3339 cannot show.
pub(super) fn unix_time(seconds: i64) -> Option<SystemTime> {
    // humantime cannot print years past 9999.
    const LAST_PRINTABLE: u64 = 253_402_300_799;
    let seconds = u64::try_from(seconds)
        .ok()
        .filter(|s| (1..=LAST_PRINTABLE).contains(s))?;
    UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// Unix seconds in RFC 3339, e.g. `2027-01-31T18:00:00Z`; `None` for zero.
pub(super) fn rfc3339(seconds: i64) -> Option<String> {
    match unix_time(seconds) {
        Some(at) => Some(humantime::format_rfc3339_seconds(at).to_string()),
        // Out of range but set: show the number rather than hide it.
        None if seconds != 0 => Some(format!("unix {seconds}")),
        None => None,
    }
}

/// Unix seconds for people, with `absent` standing in for zero.
pub(super) fn time_or(seconds: i64, absent: &str) -> String {
    rfc3339(seconds).unwrap_or_else(|| absent.to_owned())
}

/// Seconds as a human duration, e.g. `1h 30m`; negative values as they are.
pub(super) fn duration(seconds: i64) -> String {
    match u64::try_from(seconds) {
        Ok(s) => humantime::format_duration(Duration::from_secs(s)).to_string(),
        Err(_) => format!("{seconds}s"),
    }
}

/// Values joined by commas, or `empty` when there are none.
pub(super) fn list_or(values: &[String], empty: &str) -> String {
    if values.is_empty() {
        empty.to_owned()
    } else {
        values.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_without_trailing_spaces() {
        let mut table = Table::new(&["ID", "SPIFFE ID", "OWNER"]);
        table.row(vec!["e-1".into(), "spiffe://t/a".into(), "ops".into()]);
        table.row(vec![
            "entry-long".into(),
            "spiffe://t/b".into(),
            String::new(),
        ]);
        assert_eq!(
            table.render(),
            "ID          SPIFFE ID     OWNER\n\
             e-1         spiffe://t/a  ops\n\
             entry-long  spiffe://t/b\n"
        );
    }

    #[test]
    fn header_only_table() {
        assert_eq!(Table::new(&["A", "B"]).render(), "A  B\n");
    }

    #[test]
    fn short_rows_print_empty_cells() {
        let mut table = Table::new(&["A", "B", "C"]);
        table.row(vec!["x".into()]);
        assert_eq!(table.render(), "A  B  C\nx\n");
    }

    #[test]
    fn field_block_aligns_and_continues_lists() {
        let block = fields(&[
            ("id", vec!["e-1".into()]),
            ("selectors", vec!["unix:uid:1".into(), "unix:gid:2".into()]),
            ("hint", vec![]),
        ]);
        assert_eq!(
            block,
            "id:         e-1\n\
             selectors:  unix:uid:1\n            unix:gid:2\n\
             hint:\n"
        );
    }

    #[test]
    fn formats_times_and_durations() {
        assert_eq!(
            rfc3339(1_800_000_000).as_deref(),
            Some("2027-01-15T08:00:00Z")
        );
        assert_eq!(rfc3339(0), None);
        assert_eq!(rfc3339(-5).as_deref(), Some("unix -5"));
        assert_eq!(
            rfc3339(i64::MAX).as_deref(),
            Some("unix 9223372036854775807")
        );
        assert_eq!(time_or(0, "never"), "never");
        assert_eq!(duration(5400), "1h 30m");
        assert_eq!(duration(600), "10m");
        assert_eq!(duration(-1), "-1s");
    }
}
