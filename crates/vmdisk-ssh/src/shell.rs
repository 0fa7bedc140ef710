//! POSIX-shell words: splitting a string the way Nix splits `NIX_SSHOPTS` (whitespace
//! separates words; single quotes, double quotes and backslashes quote), and quoting an argument
//! for a remote shell.

/// Longest string split (an environment variable holding options).
pub const MAX_SPLIT_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SplitError {
    #[error("unterminated {0} quote")]
    Unterminated(&'static str),
    #[error("longer than {MAX_SPLIT_BYTES} bytes")]
    TooLong,
}

/// Split `s` into words as a POSIX shell would (no expansions).
pub fn split(s: &str) -> Result<Vec<String>, SplitError> {
    if s.len() > MAX_SPLIT_BYTES {
        return Err(SplitError::TooLong);
    }
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(SplitError::Unterminated("single")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(SplitError::Unterminated("double")),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(SplitError::Unterminated("double")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') => {}
                    Some(c) => cur.push(c),
                    None => cur.push('\\'),
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// `s` quoted for a POSIX shell (single quotes unless it needs none).
pub fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_like_a_shell() {
        assert_eq!(
            split(
                r#"-o StrictHostKeyChecking=no  -o 'UserKnownHostsFile /dev/null' -i "a b\"c" x\ y"#
            )
            .unwrap(),
            [
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile /dev/null",
                "-i",
                "a b\"c",
                "x y"
            ]
        );
        assert_eq!(split("").unwrap(), Vec::<String>::new());
        assert_eq!(split("''").unwrap(), [""]);
        assert_eq!(split("'a").unwrap_err(), SplitError::Unterminated("single"));
        assert_eq!(
            split("\"a").unwrap_err(),
            SplitError::Unterminated("double")
        );
    }

    proptest! {
        #[test]
        fn quoting_round_trips(words in proptest::collection::vec(".{0,12}", 0..6)) {
            let joined: Vec<String> = words.iter().map(|w| quote(w)).collect();
            prop_assert_eq!(split(&joined.join(" ")).unwrap(), words);
        }
    }
}
