//! Host-name matching as RFC 6125 §6.4 has it: case-insensitive, a trailing dot
//! ignored, and a wildcard only as the whole left-most label of a name, standing for
//! exactly one label (`*.example.com` covers `a.example.com`, not `example.com` nor
//! `a.b.example.com`).

fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether the certificate name `san` covers `domain`. A `domain` that is a wildcard
/// itself is covered only by the same wildcard.
pub fn covers(san: &str, domain: &str) -> bool {
    let (san, domain) = (normal(san), normal(domain));
    if san.is_empty() || domain.is_empty() {
        return false;
    }
    if san == domain {
        return !san.contains('*') || wildcard_well_formed(&san);
    }
    let Some(parent) = san.strip_prefix("*.") else {
        return false;
    };
    if !wildcard_well_formed(&san) || domain.starts_with("*.") {
        return false;
    }
    match domain.split_once('.') {
        Some((label, rest)) => !label.is_empty() && rest == parent,
        None => false,
    }
}

/// `*.` then at least two labels without another `*` (no `*.com`).
fn wildcard_well_formed(san: &str) -> bool {
    match san.strip_prefix("*.") {
        Some(parent) => !parent.contains('*') && parent.contains('.') && !parent.starts_with('.'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn names_match_as_rfc_6125_says() {
        let table = [
            ("a.example.com", "a.example.com", true),
            ("A.Example.COM", "a.example.com.", true),
            ("a.example.com", "b.example.com", false),
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "a.b.example.com", false),
            ("*.example.com", "*.example.com", true),
            ("a.example.com", "*.example.com", false),
            ("*.com", "example.com", false),
            ("f*.example.com", "foo.example.com", false),
            ("a.*.example.com", "a.b.example.com", false),
            ("", "", false),
        ];
        for (san, domain, want) in table {
            assert_eq!(covers(san, domain), want, "{san} covers {domain}?");
        }
    }
}
