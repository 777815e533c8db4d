//! The labelling page: one file, no outside resources. Model text is put
//! in with `textContent`, never as HTML; the guidelines are the
//! experiment's own Markdown, rendered here with any raw HTML in it shown
//! as text.

const TEMPLATE: &str = include_str!("page.html");
const GUIDELINES_SLOT: &str = "<!--GUIDELINES-->";

/// The page, with the guidelines (Markdown) in a box above the prompt.
pub fn render(guidelines: Option<&str>) -> String {
    let Some(markdown) = guidelines.filter(|g| !g.trim().is_empty()) else {
        return TEMPLATE.replace(GUIDELINES_SLOT, "");
    };
    TEMPLATE.replace(
        GUIDELINES_SLOT,
        &format!(
            "<details id=\"guidelines\" open><summary>Guidelines</summary>\n{}</details>",
            markdown_to_html(markdown)
        ),
    )
}

/// CommonMark to HTML; HTML written in the Markdown is escaped, and links
/// keep only http(s), mailto and relative targets.
fn markdown_to_html(markdown: &str) -> String {
    use pulldown_cmark::{Event, Options, Parser, Tag};
    let safe_url = |url: &str| {
        let lower = url.trim().to_ascii_lowercase();
        !lower.contains(':')
            || ["http:", "https:", "mailto:"]
                .iter()
                .any(|p| lower.starts_with(p))
    };
    let events = Parser::new_ext(
        markdown,
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH,
    )
    .map(|event| match event {
        Event::Html(html) | Event::InlineHtml(html) => Event::Text(html),
        Event::Start(Tag::Link {
            link_type,
            dest_url,
            title,
            id,
        }) if !safe_url(&dest_url) => Event::Start(Tag::Link {
            link_type,
            dest_url: "#".into(),
            title,
            id,
        }),
        Event::Start(Tag::Image { .. }) | Event::End(pulldown_cmark::TagEnd::Image) => {
            Event::Text("".into())
        }
        other => other,
    });
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, events);
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidelines_render_as_markdown_with_their_html_escaped() {
        let page = render(Some(
            "# Be kind\n\nPrefer **correct** answers.\n\n<script>alert(1)</script>\n\n[x](javascript:alert(2)) [ok](https://example.org)\n",
        ));
        assert!(page.contains("<h1>Be kind</h1>"));
        assert!(page.contains("<strong>correct</strong>"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!page.contains("javascript:"));
        assert!(page.contains("href=\"https://example.org\""));
        assert!(!render(None).contains("id=\"guidelines\""));
    }
}
