//! A small JSON reader for the messages that `cargo --message-format=json` prints, one
//! JSON object per line.
//!
//! TODO: xtask has no JSON crate among its dependencies; once it has `serde_json`,
//! parse with that and delete this module.

use anyhow::{bail, Context as _};

/// A parsed JSON value. Numbers keep their text, because cargo's messages need none.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(String),
    String(String),
    Array(Vec<Value>),
    /// Members in input order; a repeated key keeps every occurrence.
    Object(Vec<(String, Value)>),
}

impl Value {
    /// Returns the first member named `key` of an object, `None` for other values.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members
                .iter()
                .find(|(name, _)| name == key)
                .map(|(_, value)| value),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(text) => Some(text),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(value) => Some(*value),
            _ => None,
        }
    }
}

/// Maximum nesting of arrays and objects; cargo's messages nest about four deep.
const MAX_DEPTH: usize = 64;

/// Parses `text` as one JSON value with nothing but whitespace around it.
pub fn parse(text: &str) -> anyhow::Result<Value> {
    let mut parser = Parser {
        text,
        position: 0,
        depth: 0,
    };
    let value = parser
        .value()
        .with_context(|| format!("invalid JSON at byte {}", parser.position))?;
    parser.skip_whitespace();
    if parser.position != text.len() {
        bail!(
            "invalid JSON: unexpected text after the value at byte {}",
            parser.position
        );
    }
    Ok(value)
}

struct Parser<'a> {
    text: &'a str,
    /// Byte offset of the next character to read.
    position: usize,
    /// Arrays and objects entered and not yet closed.
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.text[self.position..].chars().next()
    }

    fn next_char(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.position += c.len_utf8();
        Some(c)
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t' | '\n' | '\r')) {
            self.position += 1;
        }
    }

    fn expect_char(&mut self, expected: char) -> anyhow::Result<()> {
        match self.next_char() {
            Some(c) if c == expected => Ok(()),
            Some(c) => bail!("expected {expected:?}, found {c:?}"),
            None => bail!("expected {expected:?}, found the end of the text"),
        }
    }

    fn value(&mut self) -> anyhow::Result<Value> {
        self.skip_whitespace();
        match self.peek() {
            Some('{') => self.nested(Parser::object),
            Some('[') => self.nested(Parser::array),
            Some('"') => Ok(Value::String(self.string()?)),
            Some('t') => self.literal("true", Value::Bool(true)),
            Some('f') => self.literal("false", Value::Bool(false)),
            Some('n') => self.literal("null", Value::Null),
            Some('-' | '0'..='9') => Ok(self.number()),
            Some(c) => bail!("unexpected {c:?}"),
            None => bail!("unexpected end of the text"),
        }
    }

    fn nested(&mut self, parse: fn(&mut Self) -> anyhow::Result<Value>) -> anyhow::Result<Value> {
        if self.depth == MAX_DEPTH {
            bail!("nested deeper than {MAX_DEPTH} levels");
        }
        self.depth += 1;
        let value = parse(self);
        self.depth -= 1;
        value
    }

    fn literal(&mut self, word: &str, value: Value) -> anyhow::Result<Value> {
        if !self.text[self.position..].starts_with(word) {
            bail!("expected {word}");
        }
        self.position += word.len();
        Ok(value)
    }

    /// Takes the characters a JSON number may contain; nothing here reads its value.
    fn number(&mut self) -> Value {
        let start = self.position;
        while matches!(self.peek(), Some('-' | '+' | '.' | 'e' | 'E' | '0'..='9')) {
            self.position += 1;
        }
        Value::Number(self.text[start..self.position].to_owned())
    }

    fn object(&mut self) -> anyhow::Result<Value> {
        self.expect_char('{')?;
        let mut members = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some('}') {
            self.position += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_whitespace();
            let key = self.string()?;
            self.skip_whitespace();
            self.expect_char(':')?;
            members.push((key, self.value()?));
            self.skip_whitespace();
            match self.next_char() {
                Some(',') => continue,
                Some('}') => return Ok(Value::Object(members)),
                _ => bail!("expected ',' or '}}' in an object"),
            }
        }
    }

    fn array(&mut self) -> anyhow::Result<Value> {
        self.expect_char('[')?;
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(']') {
            self.position += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.skip_whitespace();
            match self.next_char() {
                Some(',') => continue,
                Some(']') => return Ok(Value::Array(items)),
                _ => bail!("expected ',' or ']' in an array"),
            }
        }
    }

    fn string(&mut self) -> anyhow::Result<String> {
        self.expect_char('"')?;
        let mut text = String::new();
        loop {
            match self.next_char() {
                Some('"') => return Ok(text),
                Some('\\') => text.push(self.escape()?),
                Some(c) if c < ' ' => bail!("unescaped control character in a string"),
                Some(c) => text.push(c),
                None => bail!("unterminated string"),
            }
        }
    }

    /// Decodes the escape after a backslash, joining a UTF-16 surrogate pair
    /// (`\ud83d\ude00`) into one character.
    fn escape(&mut self) -> anyhow::Result<char> {
        let c = match self.next_char() {
            Some('"') => '"',
            Some('\\') => '\\',
            Some('/') => '/',
            Some('b') => '\u{8}',
            Some('f') => '\u{c}',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('t') => '\t',
            Some('u') => {
                let unit = self.hex_unit()?;
                if (0xd800..0xdc00).contains(&unit) {
                    self.expect_char('\\')?;
                    self.expect_char('u')?;
                    let low = self.hex_unit()?;
                    if !(0xdc00..0xe000).contains(&low) {
                        bail!("invalid low surrogate \\u{low:04x}");
                    }
                    let code = 0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00);
                    char::from_u32(code).context("invalid surrogate pair")?
                } else {
                    char::from_u32(unit).context("unpaired low surrogate")?
                }
            }
            Some(c) => bail!("invalid escape \\{c}"),
            None => bail!("unterminated escape"),
        };
        Ok(c)
    }

    fn hex_unit(&mut self) -> anyhow::Result<u32> {
        let digits = self
            .text
            .get(self.position..self.position + 4)
            .context("truncated \\u escape")?;
        let unit = u32::from_str_radix(digits, 16)
            .with_context(|| format!("invalid \\u escape {digits:?}"))?;
        self.position += 4;
        Ok(unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_artifact_fields_read() {
        let line = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"e2e"},"profile":{"opt_level":"0","test":true},"executable":"/w/target/debug/deps/e2e-1a","fresh":true}"#;

        let message = parse(line).expect("valid message");

        assert_eq!(
            message.get("reason").and_then(Value::as_str),
            Some("compiler-artifact")
        );
        let target = message.get("target").expect("target");
        assert_eq!(
            target.get("kind"),
            Some(&Value::Array(vec![Value::String("test".to_owned())]))
        );
        assert_eq!(
            message
                .get("profile")
                .and_then(|profile| profile.get("test"))
                .and_then(Value::as_bool),
            Some(true)
        );
        assert_eq!(
            message.get("executable").and_then(Value::as_str),
            Some("/w/target/debug/deps/e2e-1a")
        );
    }

    #[test]
    fn string_escapes_decoded() {
        let value = parse(r#""a\"b\\c\/d\n\u00e9\ud83d\ude00""#).expect("valid string");

        assert_eq!(value, Value::String("a\"b\\c/d\né😀".to_owned()));
    }

    #[test]
    fn scalars_and_whitespace() {
        let value = parse(" [null, false, -1.5e3, {} ] ").expect("valid array");

        assert_eq!(
            value,
            Value::Array(vec![
                Value::Null,
                Value::Bool(false),
                Value::Number("-1.5e3".to_owned()),
                Value::Object(Vec::new()),
            ])
        );
    }

    #[test]
    fn invalid_texts_rejected() {
        let too_deep = "[".repeat(MAX_DEPTH + 1);
        let cases = [
            ("empty", ""),
            ("unterminated string", r#""abc"#),
            ("missing colon", r#"{"a" 1}"#),
            ("trailing text", "{} x"),
            ("bad escape", r#""\x""#),
            ("lone high surrogate", r#""\ud83d""#),
            ("control character", "\"a\u{1}\""),
            ("too deep", too_deep.as_str()),
        ];
        for (case, text) in cases {
            assert!(parse(text).is_err(), "{case}: {text:?} parsed");
        }
    }
}
