"""What ``timm-gsop train | validate | benchmark`` adds to timm's reference scripts: finding them
(``timm_scripts``), the demo data (``demo_data``), recipes (``recipes``), the launcher itself (``launch``)."""
