"""Reports: results.json (``results``), the HTML report and its figures (``html``), and the
stratified sample the UMAPs draw (``plot_sample``)."""
