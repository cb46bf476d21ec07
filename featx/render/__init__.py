"""Renderers: the values featx computes (``featx.report``, ``featx.checks``) as text, Markdown, JUnit XML,
SVG and Mermaid. Each module renders; none computes a verdict."""
