/*
 * channel_sign: signs (and for WeChat Pay v3 encrypts) many messages in one
 * process, for the payment channel bench cases (bench/channel_vectors.pl):
 * one openssl process per message would take minutes.
 *
 *   channel_sign sign KEY.pem     < hex lines   prints base64 SHA256withRSA signatures
 *   channel_sign seal KEY32 NONCE AAD < hex lines   prints base64(AES-256-GCM ct || tag)
 *
 * Each input line is the message in hex; each output line answers one.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/pem.h>

static size_t
unhex(const char *s, unsigned char *out)
{
	size_t		n = 0;

	while (s[0] && s[1] && s[0] != '\n')
	{
		unsigned int b;

		sscanf(s, "%2x", &b);
		out[n++] = (unsigned char) b;
		s += 2;
	}
	return n;
}

static void
put_b64(const unsigned char *d, size_t n)
{
	static unsigned char b64[1 << 18];

	EVP_EncodeBlock(b64, d, (int) n);
	printf("%s\n", b64);
}

int
main(int argc, char **argv)
{
	static char line[1 << 19];
	static unsigned char msg[1 << 18];
	static unsigned char out[(1 << 18) + 16];

	if (argc == 3 && strcmp(argv[1], "sign") == 0)
	{
		FILE	   *f = fopen(argv[2], "r");
		EVP_PKEY   *key = f ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : NULL;

		if (key == NULL)
			return 1;
		while (fgets(line, sizeof(line), stdin))
		{
			size_t		n = unhex(line, msg);
			size_t		siglen = sizeof(out);
			EVP_MD_CTX *ctx = EVP_MD_CTX_new();

			if (EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, key) != 1 ||
				EVP_DigestSign(ctx, out, &siglen, msg, n) != 1)
				return 1;
			EVP_MD_CTX_free(ctx);
			put_b64(out, siglen);
		}
		return 0;
	}
	if (argc == 5 && strcmp(argv[1], "seal") == 0 && strlen(argv[2]) == 32)
	{
		while (fgets(line, sizeof(line), stdin))
		{
			size_t		n = unhex(line, msg);
			EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
			int			len = 0,
						fin = 0;

			if (EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
				EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, (int) strlen(argv[3]), NULL) != 1 ||
				EVP_EncryptInit_ex(ctx, NULL, NULL, (unsigned char *) argv[2],
								   (unsigned char *) argv[3]) != 1 ||
				EVP_EncryptUpdate(ctx, NULL, &len, (unsigned char *) argv[4],
								  (int) strlen(argv[4])) != 1 ||
				EVP_EncryptUpdate(ctx, out, &len, msg, (int) n) != 1 ||
				EVP_EncryptFinal_ex(ctx, out + len, &fin) != 1 ||
				EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, out + len + fin) != 1)
				return 1;
			EVP_CIPHER_CTX_free(ctx);
			put_b64(out, (size_t) len + fin + 16);
		}
		return 0;
	}
	fprintf(stderr, "usage: channel_sign sign KEY.pem | seal KEY32 NONCE AAD  < hex lines\n");
	return 2;
}
