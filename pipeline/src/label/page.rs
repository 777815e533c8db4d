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
            markdown_to_html(markdown, None)
        ),
    )
}

/// CommonMark to HTML; HTML written in the Markdown is escaped, and links
/// keep only http(s), mailto and relative targets. Images are dropped,
/// unless `images` names where plain file names (`plot.png`) are served:
/// those become `images` + name.
pub fn markdown_to_html(markdown: &str, images: Option<&str>) -> String {
    use pulldown_cmark::{Event, Options, Parser, Tag};
    let safe_url = |url: &str| {
        let lower = url.trim().to_ascii_lowercase();
        !lower.contains(':')
            || ["http:", "https:", "mailto:"]
                .iter()
                .any(|p| lower.starts_with(p))
    };
    let mut dropped_images = 0usize;
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
        Event::Start(Tag::Image {
            link_type,
            dest_url,
            title,
            id,
        }) => match images.filter(|_| is_plain_file_name(&dest_url)) {
            Some(base) => Event::Start(Tag::Image {
                link_type,
                dest_url: format!("{base}{dest_url}").into(),
                title,
                id,
            }),
            // Its alt text stays, as text.
            None => {
                dropped_images += 1;
                Event::Text("".into())
            }
        },
        Event::End(pulldown_cmark::TagEnd::Image) if dropped_images > 0 => {
            dropped_images -= 1;
            Event::Text("".into())
        }
        other => other,
    });
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, events);
    html
}

/// A file name with no folder and nothing to escape: letters, digits,
/// `.`, `-` and `_`, not starting with a dot.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
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
        let report = markdown_to_html(
            "![kl](kl.png) ![x](../x.png) ![y](http://h/y.png)",
            Some("/report/"),
        );
        assert!(report.contains("src=\"/report/kl.png\""), "{report}");
        assert!(
            !report.contains("../x.png") && !report.contains("http://h"),
            "{report}"
        );
    }
}
