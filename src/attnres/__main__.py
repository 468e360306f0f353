from attnres.cli import main

main()
