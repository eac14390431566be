"""Reports: results.json (``results``), the HTML report and its figures (``html``), the one HTML
page shell every page is written in (``page``), the one Markdown table writer (``markdown``),
and the stratified sample the UMAPs draw (``plot_sample``)."""
