from imgsvc import cli

cli.main()
