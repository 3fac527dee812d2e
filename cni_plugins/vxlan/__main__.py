from cni_plugins.vxlan import main

main()
