//! A line diff of the live file against a new render, in unified format: what an
//! operator reads in the log when a check fails, and what `render --dry-run` prints.
//! Pure.
//!
//! Rendered configs differ in a few lines in the middle, so the common head and tail are
//! cut first and an LCS runs only on the rest; past `MAX_CELLS` the middle is shown as
//! one replaced block, which is still a correct (if not minimal) diff.

const CONTEXT: usize = 3;
const MAX_CELLS: usize = 4_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Keep,
    Del,
    Add,
}

/// Unified diff of `old` → `new` with `CONTEXT` lines around each change; empty when equal.
pub(crate) fn unified(old: &str, new: &str, old_name: &str, new_name: &str) -> String {
    if old == new {
        return String::new();
    }
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let ops = line_ops(&a, &b);
    let mut out = format!("--- {old_name}\n+++ {new_name}\n");
    // Positions in a and b at the start of each op.
    let mut pos = Vec::with_capacity(ops.len());
    let (mut i, mut j) = (0, 0);
    for op in &ops {
        pos.push((i, j));
        match op {
            Op::Keep => {
                i += 1;
                j += 1;
            }
            Op::Del => i += 1,
            Op::Add => j += 1,
        }
    }
    let mut k = 0;
    while k < ops.len() {
        if ops[k] == Op::Keep {
            k += 1;
            continue;
        }
        // A hunk: from CONTEXT before this change to CONTEXT after the last change that
        // is within 2·CONTEXT of the previous one.
        let start = k.saturating_sub(CONTEXT);
        let mut end = k;
        let mut last_change = k;
        while end < ops.len() {
            if ops[end] != Op::Keep {
                last_change = end;
            } else if end - last_change > 2 * CONTEXT {
                break;
            }
            end += 1;
        }
        let end = (last_change + CONTEXT + 1).min(ops.len());
        let (ai, bj) = pos[start];
        let a_len = ops[start..end].iter().filter(|o| **o != Op::Add).count();
        let b_len = ops[start..end].iter().filter(|o| **o != Op::Del).count();
        out.push_str(&format!(
            "@@ -{},{} +{},{} @@\n",
            ai + usize::from(a_len > 0),
            a_len,
            bj + usize::from(b_len > 0),
            b_len
        ));
        for idx in start..end {
            let (x, y) = pos[idx];
            match ops[idx] {
                Op::Keep => out.push_str(&format!(" {}\n", a[x])),
                Op::Del => out.push_str(&format!("-{}\n", a[x])),
                Op::Add => out.push_str(&format!("+{}\n", b[y])),
            }
        }
        k = end;
    }
    out
}

/// The first `n` lines of the diff, with a note of how many were left out.
pub(crate) fn head(diff: &str, n: usize) -> String {
    let total = diff.lines().count();
    let mut out: String = diff.lines().take(n).map(|l| format!("{l}\n")).collect();
    if total > n {
        out.push_str(&format!("… {} more diff lines\n", total - n));
    }
    out
}

fn line_ops(a: &[&str], b: &[&str]) -> Vec<Op> {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let mut ops = vec![Op::Keep; prefix];
    if am.len().saturating_mul(bm.len()) > MAX_CELLS {
        ops.extend(std::iter::repeat_n(Op::Del, am.len()));
        ops.extend(std::iter::repeat_n(Op::Add, bm.len()));
    } else {
        ops.extend(lcs_ops(am, bm));
    }
    ops.extend(std::iter::repeat_n(Op::Keep, suffix));
    ops
}

fn lcs_ops(a: &[&str], b: &[&str]) -> Vec<Op> {
    let (n, m) = (a.len(), b.len());
    // len[i][j] = LCS length of a[i..] and b[j..], flattened.
    let w = m + 1;
    let mut len = vec![0u32; (n + 1) * w];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            len[i * w + j] = if a[i] == b[j] {
                len[(i + 1) * w + j + 1] + 1
            } else {
                len[(i + 1) * w + j].max(len[i * w + j + 1])
            };
        }
    }
    let mut ops = Vec::with_capacity(n + m);
    let (mut i, mut j) = (0, 0);
    while i < n && j < m {
        if a[i] == b[j] {
            ops.push(Op::Keep);
            i += 1;
            j += 1;
        } else if len[(i + 1) * w + j] >= len[i * w + j + 1] {
            ops.push(Op::Del);
            i += 1;
        } else {
            ops.push(Op::Add);
            j += 1;
        }
    }
    ops.extend(std::iter::repeat_n(Op::Del, n - i));
    ops.extend(std::iter::repeat_n(Op::Add, m - j));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_is_empty() {
        assert_eq!(unified("a\nb\n", "a\nb\n", "x", "y"), "");
    }

    #[test]
    fn one_line_changed_in_the_middle() {
        let old: String = (0..20).map(|i| format!("l{i}\n")).collect();
        let new = old.replace("l10\n", "L10\n");
        let d = unified(&old, &new, "live", "new");
        assert_eq!(
            d,
            "--- live\n+++ new\n@@ -8,7 +8,7 @@\n l7\n l8\n l9\n-l10\n+L10\n l11\n l12\n l13\n"
        );
    }

    #[test]
    fn additions_and_far_apart_changes_make_two_hunks() {
        let old: String = (0..40).map(|i| format!("l{i}\n")).collect();
        let new = old.replace("l2\n", "l2\nnew\n").replace("l30\n", "");
        let d = unified(&old, &new, "a", "b");
        assert_eq!(d.matches("@@ ").count(), 2, "{d}");
        assert!(d.contains("+new\n") && d.contains("-l30\n"), "{d}");
    }

    #[test]
    fn from_empty_file() {
        let d = unified("", "a\nb\n", "a", "b");
        assert!(d.contains("@@ -0,0 +1,2 @@\n+a\n+b\n"), "{d}");
    }

    #[test]
    fn head_counts_the_rest() {
        let d = "1\n2\n3\n4\n";
        assert_eq!(head(d, 2), "1\n2\n… 2 more diff lines\n");
        assert_eq!(head(d, 10), d);
    }
}
