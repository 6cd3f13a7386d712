//! Query templates: literal text with `{field}` placeholders, rendered per request.

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    Field(String),
}

/// A template such as `Review: {text}\nSentiment:`. `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = src.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) if c.is_alphanumeric() || c == '_' || c == '.' || c == '-' => {
                                name.push(c)
                            }
                            Some(c) => {
                                return Err(format!(
                                    "placeholder `{{{name}` contains `{c}`; use {{{{ for a literal brace"
                                ))
                            }
                            None => return Err(format!("placeholder `{{{name}` is not closed")),
                        }
                    }
                    if name.is_empty() {
                        return Err("empty placeholder `{}`".into());
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Field(name));
                }
                '}' => return Err("unmatched `}`; use }} for a literal brace".into()),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(Template { pieces })
    }

    /// The placeholder names, in order of first use.
    pub fn fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in &self.pieces {
            if let Piece::Field(f) = p {
                if !out.contains(&f.as_str()) {
                    out.push(f);
                }
            }
        }
        out
    }

    /// True when the template ends with literal text, so the tokens of a label appended
    /// after it do not depend on the request.
    pub fn ends_with_literal(&self) -> bool {
        matches!(self.pieces.last(), Some(Piece::Lit(_)))
    }

    /// Renders with `lookup`; a field it cannot give is an error naming the field.
    pub fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Field(f) => out.push_str(lookup(f).ok_or_else(|| f.clone())?),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_escapes() {
        let t = Template::parse("{{literal}} {text} in {district}:").unwrap();
        assert_eq!(t.fields(), vec!["text", "district"]);
        let out = t
            .render(|f| match f {
                "text" => Some("a"),
                "district" => Some("4"),
                _ => None,
            })
            .unwrap();
        assert_eq!(out, "{literal} a in 4:");
        assert_eq!(t.render(|_| None), Err("text".to_string()));
        assert!(Template::parse("{text").unwrap_err().contains("not closed"));
        assert!(Template::parse("a } b").unwrap_err().contains("unmatched"));
        assert!(Template::parse("{}").is_err());
    }
}
