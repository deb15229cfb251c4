//! Finds where things are in a TOML file, so that an error can name the
//! line, the column and the key: toml's errors carry only a byte span.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// 1-based line and column (in characters) of byte `offset` in `src`.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    // Clamp to a char boundary: spans may point into a multi-byte character.
    let offset = (0..=offset)
        .rev()
        .find(|&i| src.is_char_boundary(i))
        .unwrap_or(0);
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The key path (`mem_mib`, `disk[1].path`) whose key or value contains
/// byte `offset`, the deepest one that does; None for a file that does not
/// parse or an offset outside every key.
pub fn key_at(src: &str, offset: usize) -> Option<String> {
    let doc = DeTable::parse(src).ok()?;
    let mut path = String::new();
    find_in_table(doc.get_ref(), offset, &mut path).then_some(path)
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

// Descends into every table and array whatever its span: the span of an
// array of tables (`[[disk]]`) does not cover the tables' contents.
fn find_in_table(table: &DeTable<'_>, offset: usize, path: &mut String) -> bool {
    for (key, value) in table {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key.get_ref());
        if find_in_value(value, offset, path)
            || contains(&key.span(), offset)
            || contains(&value.span(), offset)
        {
            return true;
        }
        path.truncate(len);
    }
    false
}

/// Whether something inside `value` (not `value` itself) contains `offset`;
/// extends `path` to it if so.
fn find_in_value(value: &Spanned<DeValue<'_>>, offset: usize, path: &mut String) -> bool {
    match value.get_ref() {
        DeValue::Table(t) => find_in_table(t, offset, path),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if find_in_value(item, offset, path) || contains(&item.span(), offset) {
                    return true;
                }
                path.truncate(len);
            }
            false
        }
        _ => false,
    }
}

/// Byte span of the value at `path` (`mem_mib`, `disk[1].path`), for
/// errors found after parsing (a value out of range, a missing file) that
/// must still point into the file.
pub fn value_span(src: &str, path: &str) -> Option<Range<usize>> {
    let doc = DeTable::parse(src).ok()?;
    let mut segments = path.split('.');
    let (first, index) = split_index(segments.next()?);
    let mut value = doc.get_ref().iter().find(|(k, _)| k.get_ref() == first)?.1;
    if let Some(i) = index {
        value = value.get_ref().as_array()?.get(i)?;
    }
    for seg in segments {
        let (key, index) = split_index(seg);
        value = value
            .get_ref()
            .as_table()?
            .iter()
            .find(|(k, _)| k.get_ref() == key)?
            .1;
        if let Some(i) = index {
            value = value.get_ref().as_array()?.get(i)?;
        }
    }
    Some(value.span())
}

/// `disk[1]` → (`disk`, Some(1)); `mem_mib` → (`mem_mib`, None).
fn split_index(seg: &str) -> (&str, Option<usize>) {
    match seg.strip_suffix(']').and_then(|s| s.split_once('[')) {
        Some((key, i)) => (key, i.parse().ok()),
        None => (seg, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "kernel = \"/k\"\nmem_mib = 64\n\n[[disk]]\npath = \"/a\"\n\n[[disk]]\npath = \"/b\"\nro = true\n";

    #[test]
    fn line_and_column_are_one_based() {
        assert_eq!(line_col(SRC, 0), (1, 1));
        let at = SRC.find("64").unwrap();
        assert_eq!(line_col(SRC, at), (2, 11));
        assert_eq!(line_col("é = 1", 2), (1, 2));
        assert_eq!(line_col("x", 99), (1, 2));
    }

    #[test]
    fn finds_the_key_around_an_offset() {
        assert_eq!(
            key_at(SRC, SRC.find("64").unwrap()).as_deref(),
            Some("mem_mib")
        );
        assert_eq!(key_at(SRC, 0).as_deref(), Some("kernel"));
        let b = SRC.find("\"/b\"").unwrap();
        assert_eq!(key_at(SRC, b).as_deref(), Some("disk[1].path"));
        let ro = SRC.find("true").unwrap();
        assert_eq!(key_at(SRC, ro).as_deref(), Some("disk[1].ro"));
        assert_eq!(key_at("x = ", 0), None);
    }

    #[test]
    fn finds_a_value() {
        let span = value_span(SRC, "mem_mib").unwrap();
        assert_eq!(&SRC[span], "64");
        assert_eq!(value_span(SRC, "vcpus"), None);
        let span = value_span(SRC, "disk[1].path").unwrap();
        assert_eq!(&SRC[span], "\"/b\"");
        assert_eq!(value_span(SRC, "disk[2].path"), None);
    }
}
