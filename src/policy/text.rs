//! Positions in policy text: Cedar reports byte offsets, operators want line and column.

/// The 1-based line and column (in characters) of byte `offset` in `text`. An offset past the
/// end, or inside a character, is clamped to the nearest earlier character boundary so that a
/// stray offset still names a place rather than failing.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Byte offsets of every `@id` annotation in `text`, in text order.
///
/// Cedar keeps no source position on a parsed policy that its API exposes, so a duplicate `@id`
/// is located here instead. Only text that Cedar has already parsed is scanned, and Cedar allows
/// at most one `@id` per policy, so the n-th offset belongs to the n-th policy carrying an
/// `@id`. An `@` can only start an annotation outside strings and comments, which are skipped.
pub(super) fn id_annotations(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    // A backslash escapes the next byte, a quote included.
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'@' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                let name_start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                if &bytes[name_start..i] == b"id" {
                    found.push(start);
                }
            }
            _ => i += 1,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one_in_characters() {
        let text = "ab\nçd\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 3), (2, 1));
        // 'd' follows the two-byte 'ç': byte 5, column 2.
        assert_eq!(line_column(text, 5), (2, 2));
        assert_eq!(line_column(text, 4), (2, 1));
        assert_eq!(line_column(text, 99), (3, 1));
    }

    #[test]
    fn id_annotations_skip_strings_and_comments() {
        let text = "// @id(\"no\")\n@id(\"a\") @other(\"@id\")\npermit(principal, action, resource) when { \"@id\" == \"x\\\"@id\" };\n@ id(\"b\") forbid(principal, action, resource);";
        let found = id_annotations(text);
        assert_eq!(found.len(), 2);
        assert_eq!(line_column(text, found[0]), (2, 1));
        assert_eq!(line_column(text, found[1]), (4, 1));
    }
}
